//! Work through the coordinator: durable submit acknowledgements, a
//! signed webhook to an `Assign`, and the whole task cycle with 500
//! simulated agents.

use std::time::Duration;

use axum::http::Method;
use common::proto::admin_client::AdminClient;
use serde_json::json;
use tonic::transport::Channel;

use super::baselines::{concurrent, serial};
use super::coord::{self, Coord, submit_request};
use super::sim::{Behaviour, Event, Fleet, branch_of};
use super::{Ctx, Figure, Q, now};
use crate::github::{FakeGitHub, GitHubConfig, NewIssue, User};
use crate::webhooks::{Delivery, Encoding};

/// A repository location for manual tasks (simulated agents never clone).
fn repo(ctx: &Ctx) -> String {
    ctx.dir.join("cache").join("app.git").display().to_string()
}

pub fn submit(ctx: &mut Ctx) {
    let sled = ctx.sled();
    let unary = ctx.unary();
    let c = Coord::start(ctx, &ctx.scratch("submit"), &[]);
    let repo = repo(ctx);
    let runs = ctx.n(500, 100);
    let each = ctx.n(20, 5);
    let (one, rate, commit_mean) = ctx.rt.block_on(async {
        let admin = c.admin().await;
        let call = move |i| {
            let mut a = admin.clone();
            let req = submit_request(&repo, i);
            async move {
                a.submit_task(req).await.expect("SubmitTask");
            }
        };
        serial(20, call.clone()).await;
        let commits = || async {
            (
                c.metric("ccc_store_commit_seconds_sum").await,
                c.metric("ccc_store_commit_seconds_count").await,
            )
        };
        let before = commits().await;
        let one = serial(runs, call.clone()).await;
        let after = commits().await;
        let commit_mean = (after.0 - before.0) / (after.1 - before.1).max(1.0);
        let rate = concurrent(100, each, call).await;
        (one, rate, commit_mean)
    });
    c.stop();
    ctx.note(format!(
        "durable submit ack: the store's commit took {} on average \
         (ccc_store_commit_seconds over the serial submits), of a p50 of {}",
        Q::time(Duration::from_secs_f64(commit_mean)),
        Q::time(one.p50())
    ));
    let base = sled.p50 + unary.driver_p50;
    ctx.push(Figure::with(
        "durable submit ack, one client, p50",
        Q::time(one.p50()),
        ("B2 p50 + B4 driver read p50", Q::time(base)),
        "<= 1.5x baseline",
        one.p50().as_secs_f64() <= 1.5 * base.as_secs_f64(),
    ));
    ctx.push(Figure::with(
        "durable acks/s, 100 concurrent submitters",
        Q::rate(rate),
        (
            "B4 driver read, 100 callers",
            Q::rate(unary.driver_rate_100),
        ),
        ">= 0.5x baseline",
        rate >= 0.5 * unary.driver_rate_100,
    ));
    ctx.ack_rate = Some(rate);
}

const SECRET: &[u8] = b"a webhook secret for the bench";
const REPO: &str = "bench-org/app";

fn title(number: u64) -> String {
    format!("Login API returns 500 for an empty password ({number})")
}

/// An `issues.labeled` delivery of issue `number`, labeled `claude` by its
/// owner: the parts of GitHub's payload the coordinator reads.
fn labeled(number: u64) -> Delivery {
    let user = json!({"login": "alice", "id": 1, "type": "User"});
    Delivery::new(
        "issues",
        json!({
            "action": "labeled",
            "label": {"name": "claude"},
            "issue": {
                "number": number,
                "title": title(number),
                "body": "POST /api/login answers 500 Internal Server Error when the password \
                         field is empty.\n\nSteps to reproduce:\n1. curl -X POST /api/login \
                         -d '{\"user\":\"a\",\"password\":\"\"}'\n\nExpected: 400 with a \
                         message. The handler in app/auth/views.py raises KeyError.\n",
                "user": user,
                "labels": [{"name": "claude"}, {"name": "bug"}],
                "author_association": "OWNER",
                "html_url": format!("https://github.com/{REPO}/issues/{number}"),
                "state": "open",
            },
            "repository": {
                "full_name": REPO,
                "default_branch": "main",
                "language": "Python",
            },
            "sender": user,
        }),
    )
}

pub fn webhook(ctx: &mut Ctx) {
    let sled = ctx.sled();
    let unary = ctx.unary();
    let dir = ctx.scratch("webhook");
    let github = FakeGitHub::start(GitHubConfig::with_token(
        "ghp_bench0000000000000000000000000000000",
    ));
    github.create_repo(REPO);
    std::fs::write(dir.join("secret"), SECRET).expect("secret");
    std::fs::write(
        dir.join("token"),
        "ghp_bench0000000000000000000000000000000\n",
    )
    .expect("token");
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n\n[github]\napi_url = {api:?}\ntoken_file = {token:?}\n\
             webhook_secret_file = {secret:?}\nreconcile_every = \"1h\"\n\n\
             [[repos]]\nname = {REPO:?}\nlabel = \"claude\"\nclone_url = {clone:?}\n",
            api = github.url(),
            token = dir.join("token").display().to_string(),
            secret = dir.join("secret").display().to_string(),
            clone = repo(ctx),
        ),
    )
    .expect("config");
    let c = Coord::start(ctx, &dir, &["--config", config.to_str().expect("utf-8")]);
    let certs = coord::agent_certs(ctx, 1);
    let runs = ctx.n(200, 40) as u64;
    let url = format!("http://{}/webhook/github", c.http);
    let times = ctx.rt.block_on(async {
        let mut fleet = Fleet::start(&c.url(), &certs, &Behaviour::default(), 1).await;
        let mut times = Vec::new();
        for n in 1..=runs + 10 {
            // As on GitHub: the issue exists (its status comment goes on
            // it), and so does the branch the task pushes (its pull request
            // comes from it). Task ids count from t-1 in a new store. The
            // issue carries no trigger label on the fake, so the
            // reconciler's first pass, which may run meanwhile, never
            // creates its task before the delivery does.
            let number = github.create_issue(
                REPO,
                NewIssue::new(&title(n))
                    .labels(&["bug"])
                    .user(User::person("alice")),
            );
            github.add_branch(REPO, &branch_of(&format!("t-{n}")));
            let signed = labeled(number).sign(SECRET, Encoding::Json);
            let headers: Vec<(&str, &str)> = signed
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let start = now();
            let answer = crate::http::send(
                Method::POST,
                &url,
                &headers,
                signed.body.clone(),
                Duration::from_secs(30),
            )
            .await
            .expect("the coordinator answers");
            assert_eq!(answer.status.as_u16(), 202, "{}", answer.text());
            let assigned = loop {
                match fleet.next().await {
                    Event::Assigned { at, .. } => break at,
                    Event::Closed { why, .. } => panic!("agent closed: {why}"),
                    _ => {}
                }
            };
            // The first ten warm up.
            if n > 10 {
                times.push(assigned - start);
            }
            loop {
                if let Event::FinishedAcked { .. } = fleet.next().await {
                    break;
                }
            }
            // The task's writes to GitHub (its status comment, its pull
            // request) done before the next delivery: the figure is the
            // webhook's path, not the previous task's GitHub work.
            let drained = now() + Duration::from_secs(30);
            while c.metric("ccc_outbox_depth").await > 0.0 {
                assert!(now() < drained, "the outbox did not drain in 30 s");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        fleet.stop();
        super::Timings::new(times)
    });
    c.stop();
    drop(github);
    let base = sled.p50 + unary.http_p50;
    ctx.push(Figure::with(
        "signed webhook in -> Assign on the stream, p50",
        Q::time(times.p50()),
        ("B2 p50 + loopback HTTP round trip", Q::time(base)),
        "<= 2x baseline",
        times.p50().as_secs_f64() <= 2.0 * base.as_secs_f64(),
    ));
}

/// Submits `tasks` tasks on `repo` from `callers` concurrent submitters and
/// waits until the simulated agents of `fleet` finished every one.
pub(super) async fn submit_and_finish(
    fleet: &mut Fleet,
    admin: AdminClient<Channel>,
    repo: String,
    tasks: usize,
    callers: usize,
) {
    let submitters = tokio::spawn(concurrent(callers, tasks / callers, move |i| {
        let mut a = admin.clone();
        let req = submit_request(&repo, i);
        async move {
            a.submit_task(req).await.expect("SubmitTask");
        }
    }));
    let mut finished = 0;
    while finished < tasks {
        match fleet.next().await {
            Event::FinishedAcked { .. } => finished += 1,
            Event::Closed { agent, why } => panic!("agent {agent} closed: {why}"),
            _ => {}
        }
    }
    submitters.await.expect("submitters");
}

pub fn pipeline(ctx: &mut Ctx) {
    let ack_rate = match ctx.ack_rate {
        Some(r) => r,
        None => {
            submit(ctx);
            ctx.ack_rate.expect("measured")
        }
    };
    let agents = ctx.n(500, 200);
    let tasks = ctx.n(5000, 1000);
    let certs = coord::agent_certs(ctx, agents);
    let c = Coord::start(ctx, &ctx.scratch("pipeline"), &[]);
    let repo = repo(ctx);
    let rate = ctx.rt.block_on(async {
        let mut fleet = Fleet::start(&c.url(), &certs, &Behaviour::default(), 8).await;
        let admin = c.admin().await;
        let start = now();
        submit_and_finish(&mut fleet, admin, repo, tasks, 100).await;
        let rate = tasks as f64 / start.elapsed().as_secs_f64();
        fleet.stop();
        rate
    });
    c.stop();
    ctx.push(Figure::with(
        format!("submit->assign->accept->finish, {agents} agents"),
        Q::rate(rate),
        ("durable acks/s, 100 submitters", Q::rate(ack_rate)),
        ">= 0.3x baseline",
        rate >= 0.3 * ack_rate,
    ));
}
