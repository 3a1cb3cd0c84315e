//! `make demo`: the cluster on this machine. A demo PKI made by `ccc certs`,
//! the coordinator and four agents (one per specialty) on loopback, shown
//! with `ccc agents`; Ctrl-C stops everything.
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
    let dir = PathBuf::from("data/demo");
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
