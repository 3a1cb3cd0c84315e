//! A real Prometheus server on loopback (Debian's `prometheus` package,
//! which `make test` installs) scraping given targets every second, its
//! HTTP query API, and `promtool check metrics`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::cluster::READY;
use crate::npm::free_port;
use crate::process::{Process, eventually};

/// A Prometheus tool: `$PROMETHEUS` / `$PROMTOOL` when set, else from PATH.
/// Missing is a failure that says how to install it, never a skip.
pub fn tool(name: &str) -> PathBuf {
    let variable = name.to_ascii_uppercase();
    if let Some(path) = std::env::var_os(&variable) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: `make test` installs it (apt-get install --no-install-recommends prometheus), or set {variable} to its path"
            )
        })
}

/// A Prometheus server with its own storage in a test directory.
pub struct Prometheus {
    pub addr: SocketAddr,
    _process: Process,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`)
    /// every second; returns once it is ready to answer queries.
    pub fn start(dir: &Path, targets: &[SocketAddr]) -> Self {
        let home = dir.join("prometheus");
        std::fs::create_dir_all(&home).expect("prometheus dir");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = home.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: ccc\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("prometheus config");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(tool("prometheus"));
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                home.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(&home);
        let process = Process::spawn("prometheus", cmd, dir.join("prometheus.log"));
        let url = format!("http://{addr}/-/ready");
        eventually(READY, || {
            let answer = crate::http::get(&url, &[])?;
            if answer.status.is_success() {
                Ok(())
            } else {
                Err(format!("{url}: {}", answer.status))
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", process.log_text()));
        Self {
            addr,
            _process: process,
        }
    }

    /// An instant PromQL query: each series' labels and value.
    pub fn query(&self, promql: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
        let url = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            form_urlencoded::byte_serialize(promql.as_bytes()).collect::<String>()
        );
        let answer = crate::http::get(&url, &[])?;
        let json = answer.json();
        if json["status"] != "success" {
            return Err(format!("{promql}: {} {}", answer.status, answer.text()));
        }
        json["data"]["result"]
            .as_array()
            .ok_or_else(|| format!("{promql}: no result in {json}"))?
            .iter()
            .map(|series| {
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| format!("{promql}: no value in {series}"))?;
                Ok((series["metric"].clone(), value))
            })
            .collect()
    }

    /// The value of a query that yields one series (e.g. a `sum`).
    pub fn value(&self, promql: &str) -> Result<f64, String> {
        match self.query(promql)?.as_slice() {
            [(_, value)] => Ok(*value),
            other => Err(format!("{promql}: {other:?}")),
        }
    }
}

/// `promtool check metrics` over `text` on its stdin: its output and status
/// (problems are printed, lint warnings included).
pub fn check_metrics(text: &str) -> Output {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    child.wait_with_output().expect("promtool output")
}
