//! `make demo DEMO_ARGS=--once`: the whole story from issues to pull
//! requests runs to its end, exits 0, and leaves no process behind.

use std::process::Command;
use std::time::Duration;

use tests::{Process, TestDir, bin};

/// Processes whose command line names `dir` (the demo's children run with
/// their data directories under it).
fn processes_under(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

#[test]
fn the_demo_runs_from_issues_to_pull_requests_and_stops_everything() {
    let dir = TestDir::new("demo");
    let out = Command::new(bin("demo"))
        .arg("--once")
        .current_dir(dir.path())
        // The scripted stand-in, whatever CLI this machine has on PATH.
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for expected in [
        // Who took what, and why.
        "t-1 #1 → pc-backend (specialty backend",
        "t-2 #2 → pc-frontend (specialty frontend",
        "t-3 #3 → pc-testing (specialty testing",
        // The CLI's output, streamed live.
        "│ [tool] Edit inventory/api.py",
        // The tests of the draft fail for real.
        "FAILED (failures=2)",
        "opened a DRAFT pull request",
        "is needs_info",
        "Waiting for more information",
        "every issue ended as expected",
    ] {
        assert!(
            stdout.contains(expected),
            "no {expected:?} in:\n{stdout}\n{stderr}"
        );
    }
    // The branches are on the repository, with the stand-in's edits.
    let bare = dir.join("data/demo/inventory.git");
    let show = Command::new("git")
        .args([
            "show",
            "ccc/issue-1-add-a-health-endpoint-to-the-api:inventory/api.py",
        ])
        .current_dir(&bare)
        .output()
        .expect("git show");
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("/health"),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let left = processes_under(dir.path());
    assert!(left.is_empty(), "the demo left processes behind: {left:?}");
}

#[test]
fn ctrl_c_stops_everything_the_demo_started() {
    let dir = TestDir::new("demo-ctrl-c");
    let mut cmd = Command::new(bin("demo"));
    cmd.current_dir(dir.path())
        .env("PATH", "/usr/local/bin:/usr/bin:/bin");
    let mut demo = Process::spawn("demo", cmd, dir.join("demo.out"));
    demo.wait_for_log("press Ctrl-C", Duration::from_secs(300));
    assert!(
        !processes_under(dir.path()).is_empty(),
        "nothing of the demo runs while it waits"
    );
    let _ = Command::new("kill")
        .args(["-INT", &demo.pid().to_string()])
        .status();
    let status = demo.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        demo.log_text()
    );
    assert!(
        demo.log_text().contains("stopped everything"),
        "{}",
        demo.log_text()
    );
    let left = processes_under(dir.path());
    assert!(left.is_empty(), "the demo left processes behind: {left:?}");
}
