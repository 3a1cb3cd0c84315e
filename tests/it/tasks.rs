//! Durable tasks end to end: real coordinator and agent binaries, real
//! sled files, mutual TLS on loopback, the `fake-claude` stand-in as the CLI.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use tests::cluster::READY;
use tests::{Cluster, eventually};

const LONG: Duration = Duration::from_secs(60);
/// How long a test may take to drain a deliberately large backlog.
const DRAIN: Duration = Duration::from_secs(240);

fn attempts(task: &serde_json::Value) -> &Vec<serde_json::Value> {
    task["attempts"].as_array().expect("attempts")
}

/// The `step N of M` lines of a task's stored output, in order.
fn steps(cluster: &Cluster, id: &str) -> Vec<u64> {
    let logs = cluster.ccc_ok(&["logs", id]);
    logs.lines()
        .filter_map(|l| {
            let at = l.find("working, step ")? + "working, step ".len();
            l[at..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

#[test]
fn an_agent_killed_mid_task_loses_it_after_the_lease_and_another_agent_finishes_it() {
    // A lease long enough that a busy machine never lets the survivor's
    // expire, and work long enough to be killed in the middle of.
    let mut cluster = Cluster::new("agent-kill").with_coordinator_args(&[
        "--lease-timeout",
        "8s",
        "--retry-backoff",
        "100ms",
    ]);
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    cluster.start_agent("pc-2", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-1", "pc-2"], "connected");
    let id = cluster.submit(
        "backend",
        "slow work",
        "FAKE: write=out.txt lines=80 interval_ms=100",
    );
    let running = cluster.wait_task(&id, "running", READY);
    let first = attempts(&running)[0]["agent_id"]
        .as_str()
        .expect("agent")
        .to_owned();
    let idx = if first == "pc-1" { 0 } else { 1 };
    cluster.agents[idx].kill();

    let done = cluster.wait_task(&id, "succeeded", LONG);
    let tries = attempts(&done);
    assert_eq!(tries.len(), 2, "{done}");
    assert_eq!(tries[0]["agent_id"], first.as_str());
    assert_eq!(tries[0]["outcome"], "lease_expired", "{done}");
    assert!(
        tries[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("lease")),
        "{done}"
    );
    assert_ne!(tries[1]["agent_id"], first.as_str());
    assert_eq!(tries[1]["outcome"], "succeeded");
}

#[test]
fn a_coordinator_killed_mid_task_resumes_the_same_attempt_without_gaps_or_duplicates() {
    let mut cluster = Cluster::new("coord-kill-mid-task");
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-1"], "connected");
    let id = cluster.submit(
        "backend",
        "long output",
        "FAKE: write=out.txt lines=40 interval_ms=75",
    );
    eventually(READY, || {
        let n = steps(&cluster, &id).len();
        if n >= 5 {
            Ok(())
        } else {
            Err(format!("{n} steps so far"))
        }
    })
    .expect("output flows");
    cluster.coordinator().kill();
    std::thread::sleep(Duration::from_millis(300));
    cluster.start_coordinator();

    let done = cluster.wait_task(&id, "succeeded", LONG);
    assert_eq!(attempts(&done).len(), 1, "the same attempt went on: {done}");
    assert_eq!(steps(&cluster, &id), (1..=40).collect::<Vec<_>>());
}

/// Waits until the task's output has reached the coordinator's store up
/// to a few steps: a cut after this lands in the middle of the work.
fn some_steps_arrived(cluster: &Cluster, id: &str) {
    eventually(LONG, || {
        let n = steps(cluster, id).len();
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} steps stored"))
        }
    })
    .expect("output arrives");
}

/// A cluster whose one agent (`pc-1`, backend) reaches the coordinator
/// through a cuttable proxy, with a 60 s lease, running task `title`.
fn running_behind_a_proxy(
    name: &str,
    title: &str,
    body: &str,
) -> (Cluster, tests::proxy::Proxy, String) {
    let mut cluster = Cluster::new(name).with_coordinator_args(&["--lease-timeout", "60s"]);
    let coordinator = cluster.start_coordinator();
    let proxy = tests::proxy::Proxy::start(coordinator);
    cluster.agent_target = Some(proxy.addr);
    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-1"], "connected");
    let id = cluster.submit("backend", title, body);
    cluster.wait_task(&id, "running", READY);
    (cluster, proxy, id)
}

#[test]
fn a_network_blip_shorter_than_the_lease_requeues_nothing() {
    let (cluster, proxy, id) = running_behind_a_proxy(
        "blip",
        "through a blip",
        "FAKE: write=out.txt lines=60 interval_ms=100",
    );
    some_steps_arrived(&cluster, &id);
    proxy.cut();
    // The coordinator sees the stream die, yet the lease holds the task.
    cluster.wait_agents(&["pc-1"], "disconnected");
    std::thread::sleep(Duration::from_millis(500));
    proxy.restore();
    let done = cluster.wait_task(&id, "succeeded", LONG);
    assert_eq!(attempts(&done).len(), 1, "{done}");
    assert_eq!(steps(&cluster, &id), (1..=60).collect::<Vec<_>>());
    let agents = cluster.wait_agents(&["pc-1"], "connected");
    assert!(agents[0]["connections"].as_u64() >= Some(2));
}

#[test]
fn an_agent_that_dies_before_handing_over_its_result_hands_it_over_after_restart() {
    let (mut cluster, proxy, id) = running_behind_a_proxy(
        "result-restart",
        "finish offline",
        "FAKE: write=out.txt lines=40 interval_ms=100",
    );
    let first = cluster.agents.len() - 1;
    some_steps_arrived(&cluster, &id);
    // The coordinator is out of reach while the attempt ends (pushed), and
    // the agent dies before it can report that.
    proxy.cut();
    cluster.agents[first].wait_for_log(&format!("attempt over task_id={id}"), LONG);
    cluster.agents[first].kill();
    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    proxy.restore();

    let done = cluster.wait_task(&id, "succeeded", LONG);
    assert_eq!(
        attempts(&done).len(),
        1,
        "the work is not run again: {done}"
    );
    assert_eq!(steps(&cluster, &id), (1..=40).collect::<Vec<_>>());
}

#[test]
fn cancel_stops_a_running_task_on_its_agent() {
    let mut cluster = Cluster::new("cancel");
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-1"], "connected");
    let id = cluster.submit(
        "backend",
        "never ends",
        "FAKE: write=out.txt lines=1 hang=1",
    );
    let pid = eventually(READY, || {
        let logs = cluster.ccc_ok(&["logs", "--raw", &id]);
        logs.split("\"session_id\":\"fake-")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .ok_or_else(|| "no session id yet".to_owned())
    })
    .expect("the CLI started");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    cluster.ccc_ok(&["cancel", &id, "--reason", "changed my mind"]);
    let done = cluster.wait_task(&id, "cancelled", READY);
    assert!(
        done["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains("changed my mind")),
        "{done}"
    );
    eventually(READY, || {
        let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "));
        if gone {
            Ok(())
        } else {
            Err(format!("process {pid} still runs"))
        }
    })
    .expect("the CLI process is stopped");
    // A cancelled task can be retried; the retry names its admin.
    cluster.ccc_ok(&["retry", &id]);
    let logged = cluster.coordinator().wait_for_log("retry requested", READY);
    assert!(logged.contains("root"), "{logged}");
    cluster.wait_task(&id, "running", READY);
}

#[test]
fn logs_follow_output_live_and_grpcurl_watches_a_task() {
    let mut cluster = Cluster::new("watch");
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "frontend"]);
    cluster.wait_agents(&["pc-1"], "connected");
    let id = cluster.submit(
        "frontend",
        "watch me",
        "FAKE: write=out.txt lines=60 interval_ms=150",
    );

    let log = cluster.dir.join("follow.out");
    let mut cmd = Command::new(tests::bin("ccc"));
    cmd.arg("--coordinator")
        .arg(cluster.url())
        .arg("--certs-dir")
        .arg(&cluster.pki.dir)
        .args(["logs", "-f", &id]);
    let mut follow = tests::Process::spawn("ccc logs -f", cmd, log);
    follow.wait_for_log("working, step 2 of 60", READY);
    let task = cluster.task_json(&id).expect("task");
    assert_eq!(
        task["state"], "running",
        "output arrives while the task runs"
    );
    follow.wait_for_log(&format!("--- {id} succeeded"), LONG);
    let status = follow.wait_exit(READY).expect("logs -f ends with the task");
    assert!(status.success());
    let text = follow.log_text();
    for n in 1..=60 {
        assert_eq!(
            text.matches(&format!("[claude] working, step {n} of 60\n"))
                .count(),
            1,
            "step {n} once:\n{text}"
        );
    }

    let p = |f: &str| cluster.pki.path(f).display().to_string();
    let program = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let out = Command::new(program)
        .args([
            "-cacert",
            &p("ca.pem"),
            "-cert",
            &p("admin-root.pem"),
            "-key",
            &p("admin-root-key.pem"),
        ])
        .args(["-d", &format!("{{\"task_id\":\"{id}\",\"follow\":true}}")])
        .arg(cluster.grpc_addr.expect("addr").to_string())
        .arg("ccc.v1.Admin/WatchTask")
        .output()
        .expect("grpcurl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("\"output\""), "{text}");
    assert!(text.contains("TASK_STATE_SUCCEEDED"), "{text}");
}

#[test]
fn stale_reports_are_dropped_and_a_duplicate_result_is_harmless() {
    use common::proto::{self, agent_message, coordinator_message};

    // This hand-written agent sends no heartbeats: a long heartbeat timeout.
    let mut cluster = Cluster::new("fencing").with_coordinator_args(&[
        "--accept-timeout",
        "3s",
        "--retry-backoff",
        "100ms",
        "--heartbeat-timeout",
        "60s",
    ]);
    cluster.start_coordinator();
    let certs = cluster.pki.agent_certs("raw", &cluster.dir.join("raw"));
    common::tls::install_crypto_provider();
    // Multi-threaded: the stream keeps moving while the test blocks on `ccc`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let tls =
            common::tls::TlsPaths::for_client(&certs, common::pki::Role::Agent, None, None, None)
                .expect("paths")
                .load()
                .expect("tls");
        let channel = tonic::transport::Endpoint::from_shared(cluster.url())
            .expect("url")
            .tls_config(tls.client_config())
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let send = |msg| {
            let tx = tx.clone();
            async move {
                tx.send(proto::AgentMessage { msg: Some(msg) })
                    .await
                    .expect("send");
            }
        };
        send(agent_message::Msg::Hello(proto::Hello {
            specialties: vec![proto::Specialty::Backend as i32],
            capacity: 1,
            ..Default::default()
        }))
        .await;
        let mut inbound = proto::agent_gateway_client::AgentGatewayClient::new(channel)
            .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        async fn next(
            inbound: &mut tonic::Streaming<proto::CoordinatorMessage>,
        ) -> coordinator_message::Msg {
            loop {
                let msg = tokio::time::timeout(READY, inbound.message())
                    .await
                    .expect("in time")
                    .expect("no error")
                    .expect("open");
                match msg.msg {
                    Some(coordinator_message::Msg::Heartbeat(_)) | None => continue,
                    Some(other) => return other,
                }
            }
        }
        let inbound = &mut inbound;
        assert!(matches!(
            next(inbound).await,
            coordinator_message::Msg::Welcome(_)
        ));
        let id = cluster.submit("backend", "fenced", "");
        // Attempt 1 is never accepted: after the accept timeout it is
        // requeued, we are told to cancel it, and get attempt 2.
        assert!(
            matches!(next(inbound).await, coordinator_message::Msg::Assign(a) if a.attempt == 1)
        );
        assert!(
            matches!(next(inbound).await, coordinator_message::Msg::Cancel(c) if c.attempt == 1)
        );
        assert!(
            matches!(next(inbound).await, coordinator_message::Msg::Assign(a) if a.attempt == 2)
        );
        // Accepted at once: only attempt 1 is left to time out.
        send(agent_message::Msg::TaskAccepted(proto::TaskAccepted {
            task_id: id.clone(),
            attempt: 2,
        }))
        .await;
        // A late result of attempt 1 is dropped, and we are told again to cancel it.
        let finished = |attempt, outcome: proto::Outcome| {
            agent_message::Msg::TaskFinished(proto::TaskFinished {
                task_id: id.clone(),
                attempt,
                outcome: outcome as i32,
                message: "late".into(),
                ..Default::default()
            })
        };
        send(finished(1, proto::Outcome::Succeeded)).await;
        let told = next(inbound).await;
        assert!(
            matches!(&told, coordinator_message::Msg::Cancel(c) if c.attempt == 1),
            "{told:?}"
        );
        let task = cluster.wait_task(&id, "running", READY);
        assert_eq!(attempts(&task).len(), 2);
        // Attempt 2 finishes, twice.
        send(finished(2, proto::Outcome::Succeeded)).await;
        send(finished(2, proto::Outcome::CliFailed)).await;
        let mut acks = 0;
        while acks < 2 {
            if let coordinator_message::Msg::FinishedAck(a) = next(inbound).await {
                assert_eq!(a.attempt, 2);
                acks += 1;
            }
        }
        let done = cluster.wait_task(&id, "succeeded", READY);
        assert_eq!(attempts(&done)[1]["outcome"], "succeeded");
    });
    cluster
        .coordinator()
        .wait_for_log("dropped result of a stale attempt", READY);
}

#[test]
fn a_thousand_tasks_on_eight_agents_all_finish_once_within_capacity() {
    let mut cluster = Cluster::new("thousand");
    cluster.start_coordinator();
    let specialties = ["backend", "frontend", "testing", "devops"];
    let mut capacity = BTreeMap::new();
    for (i, specialty) in specialties.iter().cycle().take(8).enumerate() {
        let name = format!("pc-{i}");
        let slots = 2 + i % 3;
        let log = cluster.dir.join(format!("{name}.runs"));
        cluster.start_agent_with_env(
            &name,
            &["--specialties", specialty, "--capacity", &slots.to_string()],
            &[("FAKE_CLAUDE_LOG", log.to_str().expect("utf-8 path"))],
        );
        capacity.insert(name, slots);
    }
    let names: Vec<&str> = capacity.keys().map(String::as_str).collect();
    cluster.wait_agents(&names, "connected");
    let repos: Vec<String> = (0..7)
        .map(|i| {
            tests::git::bare_repo(cluster.dir.path(), &format!("repo-{i}"), &[("a", "a\n")])
                .display()
                .to_string()
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ids: Vec<String> = runtime.block_on(async {
        let mut admin = cluster.admin_client().await;
        let mut ids = Vec::new();
        for i in 0..1000 {
            let specialty = match i % 4 {
                0 => proto_specialty::Backend,
                1 => proto_specialty::Frontend,
                2 => proto_specialty::Testing,
                _ => proto_specialty::Devops,
            };
            let task = admin
                .submit_task(common::proto::SubmitTaskRequest {
                    repo: repos[i % 7].clone(),
                    title: format!("task {i}"),
                    body: "FAKE: write=out.txt lines=2".into(),
                    specialty: specialty as i32,
                    ..Default::default()
                })
                .await
                .expect("submit")
                .into_inner();
            ids.push(task.task_id);
        }
        ids
    });
    assert_eq!(ids.len(), 1000);

    // A throughput test on a shared machine: it fails when progress stops
    // for a long while, not when the machine is slow.
    #[allow(clippy::disallowed_methods)] // a test's own stopwatch
    let mut progress = (0, std::time::Instant::now());
    eventually(Duration::from_secs(900), || {
        let out = cluster.ccc(&["tasks", "--all", "--state", "succeeded", "--json"]);
        let done: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        if done.len() == 1000 {
            return Ok(());
        }
        if done.len() > progress.0 {
            #[allow(clippy::disallowed_methods)] // a test's own stopwatch
            let now = std::time::Instant::now();
            progress = (done.len(), now);
        }
        assert!(
            progress.1.elapsed() < Duration::from_secs(90),
            "no progress for 90 s: {} of 1000 succeeded",
            done.len()
        );
        Err(format!("{} of 1000 succeeded", done.len()))
    })
    .unwrap_or_else(|e| panic!("{e}"));

    let all: Vec<serde_json::Value> =
        serde_json::from_str(&cluster.ccc_ok(&["tasks", "--all", "--json"])).expect("json");
    assert_eq!(all.len(), 1000, "none lost, none invented");
    for task in &all {
        assert_eq!(attempts(task).len(), 1, "ran once: {task}");
    }
    // Each fake-claude run logged its start and end; no agent ever ran more
    // at once than its slots.
    for (name, slots) in &capacity {
        let runs =
            std::fs::read_to_string(cluster.dir.join(format!("{name}.runs"))).unwrap_or_default();
        let mut events: Vec<(u128, i32)> = runs
            .lines()
            .filter_map(|l| {
                let (what, at) = l.split_once(' ')?;
                let at: u128 = at.parse().ok()?;
                Some((at, if what == "start" { 1 } else { -1 }))
            })
            .collect();
        // Ends before starts at the same instant.
        events.sort();
        let (mut now, mut peak) = (0i32, 0i32);
        for (_, delta) in events {
            now += delta;
            peak = peak.max(now);
        }
        assert!(
            peak <= i32::try_from(*slots).unwrap_or(0),
            "{name} ran {peak} at once, has {slots} slots"
        );
        assert!(peak >= 1, "{name} ran nothing");
    }
}

use common::proto::Specialty as proto_specialty;

#[test]
fn a_coordinator_killed_at_random_moments_under_load_loses_nothing_acknowledged() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mut cluster = Cluster::new("crash-cycles").with_coordinator_args(&[
        "--retry-backoff",
        "200ms",
        "--retry-backoff-max",
        "1s",
    ]);
    cluster.start_coordinator();
    cluster.start_agent("pc-1", &["--specialties", "backend", "--capacity", "3"]);
    cluster.start_agent("pc-2", &["--specialties", "backend", "--capacity", "3"]);
    cluster.wait_agents(&["pc-1", "pc-2"], "connected");

    // A steady, bounded stream of submissions; only those `ccc` reported
    // as accepted count as acknowledged. The bound keeps the backlog the
    // agents drain afterwards the same on a fast and a slow machine.
    const MAX_SUBMISSIONS: usize = 120;
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let submitter = {
        let (acknowledged, stop) = (Arc::clone(&acknowledged), Arc::clone(&stop));
        let (url, certs, repo) = (cluster.url(), cluster.pki.dir.clone(), cluster.repo());
        std::thread::spawn(move || {
            for n in 1..=MAX_SUBMISSIONS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(40));
                let out = Command::new(tests::bin("ccc"))
                    .arg("--coordinator")
                    .arg(&url)
                    .arg("--certs-dir")
                    .arg(&certs)
                    .args(["submit", "--repo", &repo, "--specialty", "backend"])
                    .args([
                        "--title",
                        &format!("load {n}"),
                        "--body",
                        "FAKE: write=out.txt lines=3 interval_ms=30",
                    ])
                    .output()
                    .expect("run ccc");
                if out.status.success() {
                    let text = String::from_utf8_lossy(&out.stdout);
                    if let Some(id) = text.split_whitespace().next() {
                        acknowledged.lock().expect("lock").push(id.to_owned());
                    }
                }
            }
        })
    };

    let mut seen_terminal: BTreeMap<String, String> = BTreeMap::new();
    // A fixed pseudo-random sequence of kill delays (reproducible).
    let mut seed: u64 = 0x5eed;
    for cycle in 0..20 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(100 + (seed >> 33) % 400));
        cluster.coordinator().kill();
        cluster.start_coordinator();
        let acked: Vec<String> = acknowledged.lock().expect("lock").clone();
        let tasks: Vec<serde_json::Value> = eventually(READY, || {
            let out = cluster.ccc(&["tasks", "--all", "--json"]);
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
        })
        .expect("tasks listed after restart");
        let by_id: BTreeMap<&str, &serde_json::Value> = tasks
            .iter()
            .filter_map(|t| Some((t["task_id"].as_str()?, t)))
            .collect();
        for id in &acked {
            assert!(
                by_id.contains_key(id.as_str()),
                "cycle {cycle}: acknowledged {id} is lost"
            );
        }
        for (id, state) in &seen_terminal {
            assert_eq!(
                by_id.get(id.as_str()).map(|t| t["state"].as_str()),
                Some(Some(state.as_str())),
                "cycle {cycle}: {id} left its terminal state"
            );
        }
        for task in &tasks {
            let state = task["state"].as_str().unwrap_or_default();
            if matches!(state, "succeeded" | "failed" | "cancelled") {
                seen_terminal.insert(
                    task["task_id"].as_str().unwrap_or_default().to_owned(),
                    state.to_owned(),
                );
            }
        }
    }
    // The load was real: at least 20 submissions acknowledged.
    eventually(LONG, || {
        let n = acknowledged.lock().expect("lock").len();
        if n >= 20 {
            Ok(())
        } else {
            Err(format!("{n} acknowledged"))
        }
    })
    .expect("enough submissions");
    stop.store(true, Ordering::Relaxed);
    submitter.join().expect("submitter");
    let acked = acknowledged.lock().expect("lock").clone();
    assert!(
        acked.len() >= 20,
        "the load was real: {} submissions",
        acked.len()
    );

    // Draining the backlog on six slots is slow on a loaded machine; the
    // bound is generous because it is a deadline, not a measurement.
    let tasks: Vec<serde_json::Value> = eventually(DRAIN, || {
        let tasks: Vec<serde_json::Value> =
            serde_json::from_str(&cluster.ccc_ok(&["tasks", "--all", "--json"]))
                .map_err(|e| e.to_string())?;
        let mut open: BTreeMap<String, usize> = BTreeMap::new();
        for task in tasks.iter().filter(|t| t["state"] != "succeeded") {
            *open.entry(task["state"].to_string()).or_default() += 1;
        }
        if open.is_empty() {
            Ok(tasks)
        } else {
            Err(format!(
                "of {} tasks, these are not succeeded yet: {open:?}",
                tasks.len()
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for task in &tasks {
        let wins = attempts(task)
            .iter()
            .filter(|a| a["outcome"] == "succeeded")
            .count();
        assert_eq!(wins, 1, "succeeded exactly once: {task}");
    }
}

#[test]
fn the_output_of_tasks_ended_before_the_retention_is_deleted_and_the_tasks_kept() {
    let mut cluster = Cluster::new("output-retention");
    cluster.start_coordinator();
    cluster.start_agent("pc-r", &["--specialties", "backend"]);
    cluster.wait_agents(&["pc-r"], "connected");
    let id = cluster.submit("backend", "Leaves output", "FAKE: lines=3 write=OUT.md");
    cluster.wait_task(&id, "succeeded", LONG);
    assert!(
        cluster
            .ccc_ok(&["logs", &id])
            .contains("working, step 1 of 3"),
        "output stored"
    );
    cluster.coordinator().terminate(LONG);
    // Ended before this start, so older than a millisecond's retention.
    let mut cluster = cluster.with_coordinator_args(&["--output-retention", "1ms"]);
    cluster.start_coordinator();
    cluster
        .coordinator()
        .wait_for_log("deleted the output of tasks ended long ago", LONG);
    assert!(
        !cluster.ccc_ok(&["logs", &id]).contains("working, step"),
        "the output is gone"
    );
    assert_eq!(
        cluster.task_json(&id).expect("task")["state"],
        "succeeded",
        "the task is kept"
    );
}
