//! Triage through the real binaries: `ccc triage` offline, and a task
//! submitted without a specialty landing on the agent triage chose.

use std::process::{Command, Stdio};
use std::time::Duration;

use tests::process::bin;
use tests::{Cluster, TestDir};

fn ccc_triage(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(bin("ccc"))
        .arg("triage")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ccc triage");
    {
        use std::io::Write;
        let mut input = child.stdin.take().expect("stdin");
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("ccc triage output")
}

#[test]
fn ccc_triage_reads_an_issue_offline_and_tries_a_rules_file() {
    let dir = TestDir::new("ccc-triage");
    let out = ccc_triage(
        &[
            "--title",
            "Save button hidden behind the footer on Safari",
            "--label",
            "bug",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("specialty:    frontend (confidence "),
        "{text}"
    );
    assert!(
        text.contains("evidence:") && text.contains("title    frontend"),
        "{text}"
    );

    // JSON from standard input, in Japanese; stable from one run to the next.
    let issue =
        r#"{"title": "CIが落ちる", "body": "main ブランチでビルドが失敗します。", "labels": []}"#;
    let first = ccc_triage(&["-", "--json"], Some(issue));
    let second = ccc_triage(&["-", "--json"], Some(issue));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(first.stdout, second.stdout);
    let json: serde_json::Value = serde_json::from_slice(&first.stdout).expect("json");
    assert_eq!(json["specialty"], "devops");
    let keys: Vec<&str> = json
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "specialty",
        "confidence",
        "scores",
        "complexity",
        "technologies",
        "keywords",
        "evidence",
        "unclear",
        "missing",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }

    // A rules file extends the defaults before it is deployed.
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[[specialty]]\nname = \"devops\"\nkeywords = { \"widget\" = 9.0 }\n",
    )
    .expect("write rules");
    let rules = rules.display().to_string();
    let out = ccc_triage(
        &["--title", "The widget", "--rules", &rules, "--json"],
        None,
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["specialty"], "devops", "{json}");

    // Bad input: a clear error, exit 1.
    std::fs::write(dir.join("bad.toml"), "[[specialty]]\nname = \"design\"\n").expect("write");
    let bad = dir.join("bad.toml").display().to_string();
    let out = ccc_triage(&["--title", "x", "--rules", &bad], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("unknown specialty"),
        "{err}"
    );
    let out = ccc_triage(&["-"], Some("{\"body\": 1}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("standard input is not an issue as JSON"),
        "{err}"
    );
}

#[test]
fn a_task_without_a_specialty_goes_to_the_agent_triage_chose() {
    let mut cluster = Cluster::new("triaged-submit");
    cluster.start_coordinator();
    cluster.start_agent("pc-fe", &["--specialties", "frontend"]);
    cluster.start_agent("pc-be", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-fe", "pc-be"], "connected");
    let repo = cluster.repo();
    let out = cluster.ccc(&[
        "submit",
        "--repo",
        &repo,
        "--title",
        "Save button overlaps the footer on mobile Safari",
        "--body",
        "FAKE: write=out.txt lines=1\nThe button in src/components/Footer.tsx is misaligned.",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("an id")
        .to_owned();
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(notes.contains("triaged as frontend"), "{notes}");

    let done = cluster.wait_task(&id, "succeeded", Duration::from_secs(60));
    assert_eq!(done["specialty"], "frontend", "{done}");
    assert_eq!(done["attempts"][0]["agent_id"], "pc-fe", "{done}");
    assert_eq!(done["triage"]["specialty"], "frontend");
    let detail = cluster.ccc_ok(&["task", &id]);
    assert!(
        detail.contains("triage") && detail.contains("evidence:") && detail.contains("footer"),
        "{detail}"
    );
}
