//! GitHub out, through the real coordinator and agent binaries: exactly one
//! status comment per issue (edited through the phases) and exactly one pull
//! request, whatever GitHub errors or coordinator crashes happen between,
//! against the fake GitHub (behind Prism's validating proxy in the first).

use std::time::Duration;

use tests::eventually;
use tests::github::Fault;
use tests::webhooks::Encoding;

use crate::github_in::{LONG, REPO, SECRET, Setup, labeled, send, setup, setup_with};

/// The issue as GitHub holds it (by a trusted author), so that the
/// cluster's comments have somewhere to go; its number. Not labeled on the
/// fake: the reconciler (every 2 s) must not start it before its delivery,
/// which these tests send with the text they want.
fn issue(setup: &Setup, title: &str) -> u64 {
    setup.github.create_issue(
        REPO,
        tests::github::NewIssue::new(title)
            .user(tests::github::User::person("alice"))
            .author_association("OWNER"),
    )
}

const MARKER: &str = "<!-- claude-code-cluster:status -->";

fn status_comments(setup: &Setup, issue: u64) -> Vec<String> {
    setup
        .github
        .comments(REPO, issue)
        .into_iter()
        .filter(|c| c.body.starts_with(MARKER))
        .map(|c| c.body)
        .collect()
}

/// Waits until the issue has one status comment that says `says`.
fn comment_saying(setup: &Setup, issue: u64, says: &str) -> String {
    eventually(LONG, || match status_comments(setup, issue).as_slice() {
        [one] if one.contains(says) => Ok(one.clone()),
        other => Err(format!("status comments: {other:?}")),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// An issue on GitHub and its labeled delivery: the task it became.
fn trigger(setup: &Setup, title: &str, body: &str) -> (u64, String) {
    let n = issue(setup, title);
    let id = started(&send(
        setup,
        &labeled(n, title, body).sign(SECRET, Encoding::Json),
    ));
    (n, id)
}

/// The task a delivery started: created by it, or, for an issue that is
/// also labeled on the fake, by the reconciler (every 2 s) just before it.
fn started(answer: &(u16, serde_json::Value)) -> String {
    assert_eq!(answer.0, 202, "{answer:?}");
    answer.1["task_id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("{answer:?}"))
        .to_owned()
}

/// Waits for the pull request that closes issue `n`.
fn pull_closing(setup: &Setup, n: u64) -> tests::github::Issue {
    let closes = format!("Closes #{n}");
    eventually(LONG, || {
        setup
            .github
            .pulls(REPO)
            .into_iter()
            .find(|p| p.body.as_deref().is_some_and(|b| b.contains(&closes)))
            .ok_or_else(|| "no pull request yet".to_owned())
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn pull_url(pull: &tests::github::Issue) -> String {
    format!("https://github.com/{REPO}/pull/{}", pull.number)
}

fn is_draft(pull: &tests::github::Issue) -> bool {
    pull.pull.as_ref().is_some_and(|p| p.draft)
}

fn one_pull(setup: &Setup) -> tests::github::Issue {
    eventually(LONG, || match setup.github.pulls(REPO).as_slice() {
        [one] => Ok(one.clone()),
        other => Err(format!("{} pull requests", other.len())),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn count(setup: &Setup, method: &str, path_start: &str) -> usize {
    setup
        .github
        .requests()
        .iter()
        .filter(|r| r.method == method && r.path.starts_with(path_start) && r.status < 300)
        .count()
}

#[test]
fn an_issue_ends_with_one_status_comment_and_one_pull_request_with_provenance() {
    let setup = setup("gh-out", &[("pc-be", "backend")], true);
    setup.github.use_git_remote(REPO, &setup.bare);
    let n31 = issue(
        &setup,
        "Login API returns 500 when the password has a quote",
    );
    let id = started(&send(
        &setup,
        &labeled(n31, "Login API returns 500 when the password has a quote",
            "FAKE: write=fix.txt lines=5 interval_ms=100\nPOST /api/login returns an internal server error.",
        )
        .sign(SECRET, Encoding::Json),
    ));
    let done = setup.cluster.wait_task(&id, "succeeded", LONG);
    let pull = one_pull(&setup);
    let comment = comment_saying(&setup, n31, &pull_url(&pull));
    assert!(comment.contains("Done."), "{comment}");
    assert!(comment.contains("Triage: **backend**"), "{comment}");
    let body = pull.body.clone().unwrap_or_default();
    let branch = done["branch"].as_str().expect("branch");
    assert_eq!(
        pull.pull.as_ref().map(|p| p.head_ref.as_str()),
        Some(branch),
        "{pull:?}"
    );
    assert_eq!(
        pull.pull.as_ref().map(|p| p.base_ref.as_str()),
        Some("main"),
        "{pull:?}"
    );
    let closes = format!("Closes #{n31}");
    for says in [
        closes.as_str(),
        "Provenance",
        "agent `pc-be`",
        "Claude Code CLI",
        "model `fake-model`",
        "Session `",
    ] {
        assert!(body.contains(says), "{says:?} missing from {body}");
    }
    assert!(!is_draft(&pull));
    // One comment, created once and edited through the phases.
    assert_eq!(
        count(
            &setup,
            "POST",
            &format!("/repos/{REPO}/issues/{n31}/comments")
        ),
        1
    );
    assert!(
        count(&setup, "PATCH", &format!("/repos/{REPO}/issues/comments/")) >= 2,
        "the comment was not edited through the phases"
    );
    assert_eq!(count(&setup, "POST", &format!("/repos/{REPO}/pulls")), 1);
    let prism = setup._prism.as_ref().expect("prism");
    assert!(prism.violations().is_empty(), "{:?}", prism.violations());
    // `ccc task` names the pull request.
    let shown = setup.cluster.ccc_ok(&["task", &id]);
    assert!(shown.contains(&pull_url(&pull)), "{shown}");
}

#[test]
fn github_failing_and_rate_limiting_still_ends_with_one_comment_and_one_pull_whose_waits_honour_the_headers()
 {
    let setup = setup("gh-faults", &[("pc-be", "backend")], false);
    setup.github.use_git_remote(REPO, &setup.bare);
    let n41 = issue(&setup, "Fix the login API");
    setup.github.inject(
        Fault::bad_gateway()
            .times(2)
            .matching("POST", &format!("/repos/{REPO}/issues/{n41}/comments")),
    );
    setup.github.inject(
        Fault::secondary_rate_limit(3)
            .times(1)
            .matching("POST", &format!("/repos/{REPO}/pulls")),
    );
    setup.github.inject(
        Fault::primary_rate_limit(2)
            .times(1)
            .matching("GET", &format!("/repos/{REPO}/pulls")),
    );
    let id = started(&send(
        &setup,
        &labeled(
            n41,
            "Fix the login API",
            "FAKE: write=fix.txt\nThe login API fails.",
        )
        .sign(SECRET, Encoding::Json),
    ));
    setup.cluster.wait_task(&id, "succeeded", LONG);
    let pull = one_pull(&setup);
    comment_saying(&setup, n41, &pull_url(&pull));
    assert_eq!(status_comments(&setup, n41).len(), 1);
    // The secondary limit asked for 3 s: the next try came no sooner.
    let requests = setup.github.requests();
    let pulls: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path == format!("/repos/{REPO}/pulls"))
        .collect();
    assert_eq!(
        pulls.len(),
        2,
        "{:?}",
        pulls.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(pulls[0].status, 403);
    let waited = pulls[1].at.duration_since(pulls[0].at);
    assert!(
        waited >= Duration::from_millis(2900),
        "retried after {waited:?}"
    );
    // The primary limit (no requests left until the reset): nothing at
    // all went to GitHub before the reset, whatever the request.
    let limited = requests
        .iter()
        .position(|r| r.method == "GET" && r.path == format!("/repos/{REPO}/pulls"))
        .expect("the pull request was looked up");
    assert_eq!(requests[limited].status, 403);
    let next = requests
        .get(limited + 1)
        .expect("a request after the limit");
    let waited = next.at.duration_since(requests[limited].at);
    assert!(
        waited >= Duration::from_millis(900),
        "the next request came after {waited:?}"
    );
}

#[test]
fn a_coordinator_killed_before_or_right_after_the_pull_request_call_opens_exactly_one() {
    let mut setup = setup("gh-crash", &[("pc-be", "backend")], false);
    setup.github.use_git_remote(REPO, &setup.bare);
    // Killed after the push and before the pull request: the request is
    // held back by a rate limit, then the coordinator dies.
    setup.github.inject(
        Fault::primary_rate_limit(3)
            .times(1)
            .matching("GET", &format!("/repos/{REPO}/pulls")),
    );
    let n51 = issue(&setup, "Fix the login API");
    let id = started(&send(
        &setup,
        &labeled(
            n51,
            "Fix the login API",
            "FAKE: write=fix.txt\nThe login API fails.",
        )
        .sign(SECRET, Encoding::Json),
    ));
    setup.cluster.wait_task(&id, "succeeded", LONG);
    eventually(LONG, || {
        (count(&setup, "GET", &format!("/repos/{REPO}/pulls")) == 0
            && setup
                .github
                .requests()
                .iter()
                .any(|r| r.path == format!("/repos/{REPO}/pulls")))
        .then_some(())
        .ok_or_else(|| "the pull request was not tried yet".to_owned())
    })
    .expect("the rate limit was met");
    setup.cluster.coordinator().kill();
    assert!(setup.github.pulls(REPO).is_empty());
    setup.cluster.start_coordinator();
    one_pull(&setup);

    // Killed right after GitHub created the pull request, before the mark:
    // the restart finds it and opens no second one.
    setup.cluster.coordinator().kill();
    setup
        .cluster
        .set_coordinator_env("CCC_COORDINATOR_FAILPOINT", "after-pull-request-created");
    setup.cluster.start_coordinator();
    // Not labeled on GitHub's side, so that the reconciler (which lists
    // labeled issues every 2 s) cannot start it before its delivery.
    let n52 = setup.github.create_issue(
        REPO,
        tests::github::NewIssue::new("Fix the signup API")
            .user(tests::github::User::person("alice"))
            .author_association("OWNER"),
    );
    let answer = send(
        &setup,
        &labeled(
            n52,
            "Fix the signup API",
            "FAKE: write=signup.txt\nThe signup API fails.",
        )
        .sign(SECRET, Encoding::Json),
    );
    let second = answer.1["task_id"]
        .as_str()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("{answer:?}"))
        .to_owned();
    let status = setup
        .cluster
        .coordinator()
        .wait_exit(LONG)
        .expect("the failpoint stopped the coordinator");
    assert_eq!(status.code(), Some(86));
    assert_eq!(setup.github.pulls(REPO).len(), 2);
    setup
        .cluster
        .set_coordinator_env("CCC_COORDINATOR_FAILPOINT", "");
    setup.cluster.start_coordinator();
    setup.cluster.wait_task(&second, "succeeded", LONG);
    eventually(LONG, || {
        let task = setup.cluster.task_json(&second)?;
        task["pull_request"]
            .as_str()
            .filter(|u| !u.is_empty())
            .map(|_| ())
            .ok_or_else(|| format!("{task}"))
    })
    .expect("the restart marked the pull request");
    assert_eq!(
        setup.github.pulls(REPO).len(),
        2,
        "a second pull request for one task"
    );
    assert_eq!(count(&setup, "POST", &format!("/repos/{REPO}/pulls")), 2);
}

#[test]
fn failing_tests_and_a_turn_limit_open_draft_pull_requests_and_a_failing_cli_opens_none() {
    let setup = setup_with(
        "gh-drafts",
        &[("pc-be", "backend")],
        false,
        "test_command = \"test -e never-there.txt\"",
        None,
    );
    setup.github.use_git_remote(REPO, &setup.bare);
    let (n61, tests_fail) = trigger(
        &setup,
        "Fix the login API",
        "FAKE: write=fix.txt\nThe login API fails.",
    );
    setup.cluster.wait_task(&tests_fail, "succeeded", LONG);
    let draft = pull_closing(&setup, n61);
    assert!(is_draft(&draft), "{draft:?}");
    assert!(
        draft
            .body
            .as_deref()
            .is_some_and(|b| b.contains("the tests failed"))
    );

    let (n62, limit) = trigger(
        &setup,
        "Refactor the login API",
        "FAKE: write=partial.txt exit=1 result=error_max_turns\nRefactor it.",
    );
    setup.cluster.wait_task(&limit, "failed", LONG);
    let draft = pull_closing(&setup, n62);
    assert!(is_draft(&draft));
    assert!(
        draft
            .body
            .as_deref()
            .is_some_and(|b| b.contains("turn limit")),
        "{draft:?}"
    );

    let n63 = issue(&setup, "Fix the API");
    let broken = started(&send(
        &setup,
        &labeled(n63, "Fix the API", "FAKE: exit=3 result=error\nIt fails.")
            .sign(SECRET, Encoding::Json),
    ));
    setup.cluster.wait_task(&broken, "failed", LONG);
    let comment = comment_saying(&setup, n63, "Failed");
    assert!(comment.contains("/claude retry"), "{comment}");
    assert!(
        !setup.github.pulls(REPO).iter().any(|p| p
            .body
            .as_deref()
            .is_some_and(|b| b.contains(&format!("Closes #{n63}")))),
        "a pull request for a failed CLI"
    );
}

#[test]
fn a_claude_comment_and_a_review_on_the_clusters_pull_request_push_to_its_branch() {
    let setup = setup("gh-follow", &[("pc-be", "backend")], false);
    setup.github.use_git_remote(REPO, &setup.bare);
    let n = issue(&setup, "Fix the login API");
    let first = started(&send(
        &setup,
        &labeled(
            n,
            "Fix the login API",
            "FAKE: write=fix.txt\nThe login API fails.",
        )
        .sign(SECRET, Encoding::Json),
    ));
    let done = setup.cluster.wait_task(&first, "succeeded", LONG);
    let branch = done["branch"].as_str().expect("branch").to_owned();
    let pull = one_pull(&setup);
    eventually(LONG, || {
        let t = setup.cluster.task_json(&first)?;
        (t["pull_request"] == pull_url(&pull).as_str())
            .then_some(())
            .ok_or_else(|| format!("{t}"))
    })
    .expect("the pull request is marked");

    // A `/claude` comment on the pull request: a follow-up on its branch.
    let on_pull = tests::webhooks::Delivery::example("issue_comment", Some("created"))
        .repository(REPO)
        .issue_number(pull.number)
        .issue_author("ccc-bot", tests::webhooks::UserKind::User, "NONE")
        .set(
            "/issue/pull_request",
            serde_json::json!({"url": format!("https://api.github.com/repos/{REPO}/pulls/{}", pull.number)}),
        )
        .comment(
            "/claude FAKE: write=more.txt\nAlso handle empty passwords.",
            "bob",
            tests::webhooks::UserKind::User,
            "MEMBER",
        );
    let second = started(&send(&setup, &on_pull.sign(SECRET, Encoding::Json)));
    let done = setup.cluster.wait_task(&second, "succeeded", LONG);
    assert_eq!(done["branch"], branch.as_str(), "{done}");
    let files = tests::git::branch_files(&setup.bare, &branch).expect("the branch");
    assert!(
        files.iter().any(|f| f == "more.txt") && files.iter().any(|f| f == "fix.txt"),
        "{files:?}"
    );

    // A review with two inline comments: one follow-up, given the comments
    // with their file and line.
    let review = setup.github.add_review(
        REPO,
        pull.number,
        tests::github::User::person("carol"),
        &[
            ("src/login.py", 12, "Validate the length here."),
            ("tests/test_login.py", 3, "Add a case for this."),
        ],
    );
    let reviewed = tests::webhooks::Delivery::example("pull_request_review", Some("submitted"))
        .repository(REPO)
        .set("/pull_request/number", serde_json::json!(pull.number))
        .set("/review/id", serde_json::json!(review))
        .set("/review/state", serde_json::json!("changes_requested"))
        .set(
            "/review/body",
            serde_json::json!("FAKE: write=review.txt\nPlease address these."),
        )
        .set("/review/author_association", serde_json::json!("MEMBER"))
        .set("/review/user/login", serde_json::json!("carol"))
        .set("/review/user/type", serde_json::json!("User"));
    let third = started(&send(&setup, &reviewed.sign(SECRET, Encoding::Json)));
    setup.cluster.wait_task(&third, "succeeded", LONG);
    let files = tests::git::branch_files(&setup.bare, &branch).expect("the branch");
    assert!(files.iter().any(|f| f == "review.txt"), "{files:?}");
    let prompts: Vec<String> = std::fs::read_dir(&setup.prompts)
        .expect("prompts")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    assert!(
        prompts.iter().any(
            |p| p.contains("src/login.py line 12: Validate the length here.")
                && p.contains("tests/test_login.py line 3: Add a case for this.")
                && p.contains("Review by @carol (changes requested)")
        ),
        "{prompts:?}"
    );
    // Still one pull request, updated by the follow-ups.
    eventually(LONG, || {
        let t = setup.cluster.task_json(&third)?;
        (t["pull_request"] == pull_url(&pull).as_str())
            .then_some(())
            .ok_or_else(|| format!("{t}"))
    })
    .expect("the follow-up's pull request is the same");
    assert_eq!(setup.github.pulls(REPO).len(), 1);
    assert_eq!(count(&setup, "POST", &format!("/repos/{REPO}/pulls")), 1);
}

#[test]
fn a_github_app_writes_with_installation_tokens_that_never_reach_the_logs() {
    let (private, public) = crate::fakes::rsa_key_pair();
    let mut setup = setup_with(
        "gh-app",
        &[("pc-be", "backend")],
        false,
        "",
        Some((4242, &private, &public)),
    );
    setup.github.use_git_remote(REPO, &setup.bare);
    let n = issue(&setup, "Fix the login API");
    let id = started(&send(
        &setup,
        &labeled(
            n,
            "Fix the login API",
            "FAKE: write=fix.txt\nThe login API fails.",
        )
        .sign(SECRET, Encoding::Json),
    ));
    setup.cluster.wait_task(&id, "succeeded", LONG);
    let pull = one_pull(&setup);
    comment_saying(&setup, n, &pull_url(&pull));
    // Every write went with a token the App minted for the repository.
    let minted = setup.github.minted_tokens();
    assert!(!minted.is_empty());
    for r in setup
        .github
        .requests()
        .iter()
        .filter(|r| r.method != "GET" && r.status < 300)
    {
        if r.path.starts_with("/app/") {
            continue;
        }
        let credential = r.header("authorization").unwrap_or_default();
        assert!(
            minted.iter().any(|t| credential.ends_with(t.as_str())),
            "{} {} was not made with an installation token: {credential}",
            r.method,
            r.path
        );
    }
    // Neither the tokens nor the App's key show in the coordinator's log.
    setup.cluster.coordinator().kill();
    let log = std::fs::read_to_string(setup.cluster.dir.join("coordinator.log")).expect("log");
    for token in &minted {
        assert!(!log.contains(token.as_str()), "a token in the log");
    }
    assert!(log.contains("minted an installation token"), "{log}");
    let key_line = private.lines().nth(1).expect("a key line");
    assert!(!log.contains(key_line), "the key in the log");
}

#[test]
fn an_agent_pushes_with_the_installation_token_minted_for_its_task_and_keeps_it_nowhere() {
    let (private, public) = crate::fakes::rsa_key_pair();
    let mut setup = setup_with(
        "gh-push",
        &[("pc-be", "backend")],
        false,
        "",
        Some((4343, &private, &public)),
    );
    setup.github.use_git_remote(REPO, &setup.bare);
    // The repository over HTTP, letting in only the App's minted tokens.
    let accepts = setup.github.token_checker();
    let server =
        tests::git_http::GitHttp::start(setup.cluster.dir.path(), std::sync::Arc::new(accepts));
    let config = setup.cluster.dir.join("coordinator.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let clone_line = format!("clone_url = {:?}", setup.bare.display().to_string());
    assert!(text.contains(&clone_line), "{text}");
    std::fs::write(
        &config,
        text.replace(
            &clone_line,
            &format!("clone_url = {:?}", server.url("hello-world.git")),
        ),
    )
    .expect("config");
    setup.cluster.coordinator().kill();
    setup.cluster.start_coordinator();
    setup.cluster.wait_agents(&["pc-be"], "connected");

    let (n, id) = trigger(
        &setup,
        "Fix the login API",
        "FAKE: write=fix.txt\nThe login API fails.",
    );
    let done = setup.cluster.wait_task(&id, "succeeded", LONG);
    let branch = done["branch"].as_str().expect("branch");
    let files = tests::git::branch_files(&setup.bare, branch).expect("the pushed branch");
    assert!(files.iter().any(|f| f == "fix.txt"), "{files:?}");
    pull_closing(&setup, n);
    // The agent offered only the installation token, as x-access-token.
    let minted = setup.github.minted_tokens();
    let offered = server.offered();
    assert!(!offered.is_empty());
    for (user, token) in &offered {
        assert_eq!(user, "x-access-token");
        assert!(minted.contains(token), "an unknown token was offered");
    }
    // Not in any log, nor anywhere in the agent's data directory.
    setup.cluster.coordinator().kill();
    let mut files = vec![
        setup.cluster.dir.join("coordinator.log"),
        setup.cluster.dir.join("agent-pc-be.log"),
    ];
    let mut dirs = vec![setup.cluster.dir.join("agent-pc-be")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for file in &files {
        let bytes = std::fs::read(file).unwrap_or_default();
        for token in &minted {
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "a token in {}",
                file.display()
            );
        }
    }
}
