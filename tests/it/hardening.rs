//! What an operator meets first: tasks that can never run are refused at
//! submit with the field named, and a queued task says why it waits.

use common::proto::{GetTaskRequest, SubmitTaskRequest};
use tests::Cluster;

fn runtime() -> tokio::runtime::Runtime {
    common::tls::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_task_that_can_never_run_is_refused_at_submit_with_the_field_named() {
    let mut cluster = Cluster::new("submit-validation");
    cluster.start_coordinator();
    let repo = cluster.repo();
    for (args, field, says) in [
        (vec!["--repo", "not a url"], "repo", "contains white space"),
        (
            vec!["--repo", "relative/path"],
            "repo",
            "is not a repository location",
        ),
        (
            vec!["--repo", "ftp://host/repo.git"],
            "repo",
            "unsupported scheme",
        ),
        (
            vec!["--repo", repo.as_str(), "--base", "main branch"],
            "base_branch",
            "is not a branch name",
        ),
        (
            vec!["--repo", repo.as_str(), "--follow-up-branch=-x"],
            "follow_up_branch",
            "is not a branch name",
        ),
    ] {
        let mut full = vec!["submit", "--title", "t", "--specialty", "backend"];
        full.extend(args.iter().copied());
        let out = cluster.ccc(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(&format!("{field}: ")) && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
    let listed = cluster.ccc_ok(&["tasks", "--json"]);
    assert_eq!(listed.trim(), "[]", "a refused task was stored");
}

#[test]
fn a_queued_task_says_why_it_waits() {
    let mut cluster = Cluster::new("waiting-reason");
    cluster.start_coordinator();
    cluster.start_agent("pc-be", &["--specialties", "backend", "--capacity", "1"]);
    cluster.wait_agents(&["pc-be"], "connected");
    let repo = cluster.repo();
    runtime().block_on(async {
        let mut admin = cluster.admin_client().await;
        let frontend = admin
            .submit_task(SubmitTaskRequest {
                repo: repo.clone(),
                title: "Fix the header".into(),
                specialty: common::proto::Specialty::Frontend as i32,
                ..Default::default()
            })
            .await
            .expect("submitted")
            .into_inner();
        assert_eq!(
            frontend.waiting_reason,
            "no connected agent has specialty frontend; general agents may take it after 2m \
             (none is connected now)"
        );
        let again = admin
            .get_task(GetTaskRequest {
                task_id: frontend.task_id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        assert!(
            again
                .waiting_reason
                .starts_with("no connected agent has specialty frontend"),
            "{again:?}"
        );
    });
}
