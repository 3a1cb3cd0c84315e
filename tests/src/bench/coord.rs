//! The real coordinator binary on loopback, its PKI and its clients.
//!
//! The PKI is made once in `<data-dir>/certs` with `common::pki` and kept:
//! issuing 500 agent certificates takes a while.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::pki::{PkiDir, Role, Validity};
use common::proto::admin_client::AdminClient;
use common::tls::{TlsMaterial, TlsPaths};
use tonic::transport::{Channel, Endpoint};

use super::{Ctx, now};
use crate::cluster::field;
use crate::process::{Process, bin};

/// The bench's PKI: CA, server certificate for loopback, admin `root`.
pub fn pki(ctx: &Ctx) -> PathBuf {
    let dir = ctx.dir.join("certs");
    let pki = PkiDir::new(&dir);
    let validity = Validity::days_from_now(365);
    if !dir.join("ca.pem").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        pki.init(validity, false).expect("CA");
    }
    if !dir.join("coordinator.pem").exists() {
        pki.issue_server(&["127.0.0.1".into(), "localhost".into()], validity, true)
            .expect("server certificate");
    }
    if !dir.join("admin-root.pem").exists() {
        pki.issue_client(Role::Admin, "root", validity, true)
            .expect("admin certificate");
    }
    dir
}

/// The TLS material of `n` agents `sim-0000`..., issued once and kept in
/// `<data-dir>/certs/agents`.
pub fn agent_certs(ctx: &Ctx, n: usize) -> Vec<(String, TlsMaterial)> {
    let certs = pki(ctx);
    let dir = certs.join("agents");
    std::fs::create_dir_all(&dir).expect("agent certs dir");
    let ca = PkiDir::new(&certs).load_ca().expect("the bench CA");
    let ca_pem = std::fs::read(certs.join("ca.pem")).expect("ca.pem");
    let validity = Validity::days_from_now(365);
    let mut made = 0;
    let out = (0..n)
        .map(|i| {
            let name = format!("sim-{i:04}");
            let cert = dir.join(format!("agent-{name}.pem"));
            let key = dir.join(format!("agent-{name}-key.pem"));
            if !cert.exists() || !key.exists() {
                let pair = ca
                    .issue_client(Role::Agent, &name, validity)
                    .expect("agent certificate");
                std::fs::write(&key, &pair.key_pem).expect("write key");
                std::fs::write(&cert, &pair.cert_pem).expect("write cert");
                made += 1;
            }
            let material = TlsMaterial {
                ca_pem: ca_pem.clone(),
                cert_pem: std::fs::read(&cert).expect("cert"),
                key_pem: std::fs::read(&key).expect("key"),
            };
            (name, material)
        })
        .collect();
    if made > 0 {
        eprintln!("  issued {made} agent certificates (kept for later runs)");
    }
    out
}

/// A coordinator process with its directory and addresses.
pub struct Coord {
    pub dir: PathBuf,
    pub certs: PathBuf,
    pub process: Process,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// From the spawn to its "coordinator ready" line.
    pub ready_after: Duration,
}

/// How long a coordinator may take to be ready (a large store is restored).
const READY: Duration = Duration::from_secs(300);

impl Coord {
    /// A series of the coordinator's `/metrics` (summed over its labels).
    pub async fn metric(&self, name: &str) -> f64 {
        let answer = crate::http::send(
            axum::http::Method::GET,
            &format!("http://{}/metrics", self.http),
            &[],
            Vec::new(),
            Duration::from_secs(10),
        )
        .await
        .expect("metrics");
        answer
            .text()
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter(|rest| rest.starts_with([' ', '{']))
            .filter_map(|rest| rest.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    }

    /// Starts the release coordinator with its data in `dir` (kept as it
    /// is: a restart opens the same store) and `args` added.
    pub fn start(ctx: &Ctx, dir: &Path, args: &[&str]) -> Self {
        let certs = pki(ctx);
        std::fs::create_dir_all(dir).expect("coordinator dir");
        let mut cmd = Command::new(bin("ccc-coordinator"));
        cmd.arg("--certs-dir")
            .arg(&certs)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(args);
        let log = dir.join("coordinator.log");
        let _ = std::fs::remove_file(&log);
        let started = now();
        let process = Process::spawn("coordinator", cmd, log);
        let mut listening = None;
        let deadline = started + READY;
        let ready_after = loop {
            let text = process.log_text();
            if listening.is_none() {
                listening = text
                    .lines()
                    .find(|l| l.contains("coordinator listening"))
                    .map(str::to_owned);
            }
            if listening.is_some() && text.contains("coordinator ready") {
                break started.elapsed();
            }
            assert!(
                now() < deadline,
                "the coordinator was not ready after {READY:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let line = listening.expect("listening line");
        let addr = |key| -> SocketAddr {
            field(&line, key)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        Self {
            dir: dir.to_owned(),
            certs,
            grpc: addr("grpc_addr"),
            http: addr("http_addr"),
            process,
            ready_after,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.grpc)
    }

    /// Stops it with SIGTERM (a clean stop: the store is closed).
    pub fn stop(mut self) {
        self.process.terminate(Duration::from_secs(30));
    }

    /// A channel as admin `root`.
    pub async fn admin_channel(&self) -> Channel {
        let tls = TlsPaths::for_client(&self.certs, Role::Admin, None, None, None)
            .expect("admin cert paths")
            .load()
            .expect("admin cert");
        connect(&self.url(), &tls).await
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.admin_channel().await)
    }
}

/// A channel to `url` over mutual TLS with `tls`.
pub async fn connect(url: &str, tls: &TlsMaterial) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .expect("url")
        .tls_config(tls.client_config())
        .expect("tls config")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e:?}"))
}

/// A manual task on `repo` (a path; simulated agents never clone it).
pub fn submit_request(repo: &str, n: usize) -> common::proto::SubmitTaskRequest {
    common::proto::SubmitTaskRequest {
        repo: repo.to_owned(),
        title: format!("Fix the login handler, case {n}"),
        body: "POST /api/login answers 500 when the password is empty; it should answer 400."
            .into(),
        specialty: common::proto::Specialty::Backend as i32,
        ..Default::default()
    }
}
