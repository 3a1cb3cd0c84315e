//! `make demo`: the cluster on this machine. A demo PKI made by `ccc certs`,
//! the coordinator and four agents (one per specialty) on loopback, shown
//! with `ccc agents`; then one task per specialty is submitted, placed on
//! the matching agent, and one of them is followed live with `ccc logs -f`.
//! Ctrl-C stops everything. The agents run the scripted `fake-claude`
//! stand-in for the CLI (no API key needed).
//!
//! Everything lives in `data/demo/` (logs included) and is made anew on
//! each run.

use std::path::PathBuf;
use std::time::Duration;

use tests::{Cluster, TestDir};

const AGENTS: [(&str, &str); 4] = [
    ("pc-backend", "backend"),
    ("pc-frontend", "frontend"),
    ("pc-testing", "testing"),
    ("pc-devops", "devops"),
];

fn main() -> std::process::ExitCode {
    // Absolute: the repository's location goes to agents, which run
    // elsewhere (their own data directories), and is checked at submit.
    let dir = std::env::current_dir()
        .unwrap_or_else(|_| PathBuf::from("."))
        .join("data/demo");
    println!(
        "== Claude Code Cluster demo (files and logs in {}/)",
        dir.display()
    );
    let mut cluster = Cluster::in_dir(TestDir::persistent(dir.clone()));
    println!(
        "== made a demo PKI with `ccc certs` in {}",
        cluster.pki.dir.display()
    );
    let addr = cluster.start_coordinator();
    println!("== coordinator listening on {addr} (mutual TLS)");
    for (name, specialty) in AGENTS {
        cluster.start_agent(name, &["--specialties", specialty, "--capacity", "2"]);
    }
    let names: Vec<&str> = AGENTS.iter().map(|(n, _)| *n).collect();
    cluster.wait_agents(&names, "connected");
    println!("== {} agents connected:\n", names.len());
    let out = cluster.ccc(&["agents"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));

    println!("\n== submitting one task per specialty with `ccc submit`");
    let mut followed = String::new();
    for (title, specialty) in [
        ("Add a /health endpoint to the API", "backend"),
        ("Fix the login form layout on mobile", "frontend"),
        ("Cover the billing module with tests", "testing"),
        ("Add a CI job that builds the Docker image", "devops"),
    ] {
        let id = cluster.submit(
            specialty,
            title,
            "FAKE: lines=12 interval_ms=250 write=CHANGES.md",
        );
        println!("   {id}  {specialty:<9} {title}");
        if followed.is_empty() {
            followed = id;
        }
    }
    println!("\n== following {followed} live (`ccc logs -f {followed}`):\n");
    let status = std::process::Command::new(tests::bin("ccc"))
        .arg("--coordinator")
        .arg(cluster.url())
        .arg("--certs-dir")
        .arg(&cluster.pki.dir)
        .args(["logs", "-f", &followed])
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("demo: ccc logs -f failed");
    }
    // Let the others finish too, then show where everything ran.
    let _ = tests::eventually(Duration::from_secs(30), || {
        let out = cluster.ccc(&["tasks", "--all", "--state", "succeeded", "--json"]);
        let done: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        if done.len() == 4 {
            Ok(())
        } else {
            Err("running".into())
        }
    });
    println!("\n== tasks (`ccc tasks`):\n");
    print!("{}", cluster.ccc_ok(&["tasks"]));
    println!("\n== why {followed} went where it did (`ccc task {followed}`):\n");
    print!("{}", cluster.ccc_ok(&["task", &followed]));
    let repo = cluster.repo();
    println!("\n== branches the agents pushed to {repo}:\n");
    let branches = std::process::Command::new("git")
        .args(["branch", "--list", "ccc/*"])
        .current_dir(&repo)
        .output();
    if let Ok(out) = branches {
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    let ccc = tests::bin("ccc");
    println!(
        "\n== try it from another terminal:\n   {} --coordinator {} --certs-dir {} agents\n   grpcurl -cacert {d}/ca.pem -cert {d}/admin-root.pem -key {d}/admin-root-key.pem {addr} list",
        ccc.display(),
        cluster.url(),
        cluster.pki.dir.display(),
        d = cluster.pki.dir.display(),
    );
    println!("\n== press Ctrl-C to stop the cluster");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(common::signal::terminated());
    println!("\n== stopping");
    for agent in &mut cluster.agents {
        agent.terminate(Duration::from_secs(5));
    }
    cluster.coordinator().terminate(Duration::from_secs(5));
    println!("== stopped; logs are in {}/", dir.display());
    std::process::ExitCode::SUCCESS
}
