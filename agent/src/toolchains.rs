//! Which tools this PC has, probed once at start so the coordinator can place
//! an issue on a PC that has what it needs (a Terraform issue on the PC with
//! terraform). Each probe runs `<tool> <version args>` with its own timeout,
//! all probes at once; a missing tool is simply not listed.

use std::time::Duration;

use common::types::Toolchain;
use serde::Deserialize;
use tokio::task::JoinSet;
use tracing::debug;

use crate::runner;

/// A tool to look for and how to ask its version.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub name: String,
    /// Program and arguments, e.g. `["kubectl", "version", "--client"]`.
    pub command: Vec<String>,
}

impl Probe {
    fn new(name: &str, command: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// The tools issues commonly need. `claude` is not among them: the agent
/// advertises the CLI it checked at start, the one its attempts run.
pub fn default_probes() -> Vec<Probe> {
    [
        ("git", &["git", "--version"][..]),
        ("python3", &["python3", "--version"]),
        ("pip", &["pip3", "--version"]),
        ("pytest", &["pytest", "--version"]),
        ("node", &["node", "--version"]),
        ("npm", &["npm", "--version"]),
        ("cargo", &["cargo", "--version"]),
        ("go", &["go", "version"]),
        ("java", &["java", "-version"]),
        ("maven", &["mvn", "--version"]),
        ("gcc", &["gcc", "--version"]),
        ("make", &["make", "--version"]),
        ("docker", &["docker", "--version"]),
        ("kubectl", &["kubectl", "version", "--client"]),
        ("helm", &["helm", "version", "--short"]),
        ("terraform", &["terraform", "version"]),
        ("psql", &["psql", "--version"]),
        ("redis-cli", &["redis-cli", "--version"]),
        ("chromium", &["chromium", "--version"]),
    ]
    .into_iter()
    .map(|(name, cmd)| Probe::new(name, cmd))
    .collect()
}

/// The probes to run: the defaults minus `hide`, plus `extra` (an extra
/// probe with a default's name replaces it).
pub fn plan(hide: &[String], extra: &[Probe]) -> Vec<Probe> {
    let mut probes: Vec<Probe> = default_probes()
        .into_iter()
        .filter(|p| !extra.iter().any(|e| e.name == p.name))
        .chain(extra.iter().cloned())
        .filter(|p| !hide.contains(&p.name) && !p.command.is_empty())
        .collect();
    probes.sort_by(|a, b| a.name.cmp(&b.name));
    probes
}

/// Probes running at once: enough to finish quickly, few enough that PCs
/// starting several agents at once do not time their probes out.
const CONCURRENT_PROBES: usize = 4;

/// Runs the probes, a few at a time; returns the tools found, sorted by name.
pub async fn detect(probes: Vec<Probe>, timeout: Duration) -> Vec<Toolchain> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT_PROBES));
    let mut set = JoinSet::new();
    for probe in probes {
        let permits = std::sync::Arc::clone(&permits);
        set.spawn(async move {
            let _permit = permits.acquire_owned().await.ok()?;
            let (program, args) = probe.command.split_first()?;
            match runner::run_captured(program, args, &[], None, timeout).await {
                Ok(out) => {
                    let version = parse_version(&out.stdout, &probe.name)
                        .or_else(|| parse_version(&out.stderr, &probe.name))
                        .unwrap_or_else(|| "unknown".into());
                    if !out.success && version == "unknown" {
                        debug!(tool = %probe.name, "probe failed");
                        return None;
                    }
                    Some(Toolchain {
                        name: probe.name,
                        version,
                    })
                }
                Err(e) => {
                    debug!(tool = %probe.name, error = %e, "tool not available");
                    None
                }
            }
        });
    }
    let mut found: Vec<Toolchain> = set.join_all().await.into_iter().flatten().collect();
    found.sort();
    found
}

/// The first version-looking token of the first line that has one,
/// preferring lines that name the tool (tools often print a runtime's version
/// too): `Python 3.11.7` -> `3.11.7`, `v20.2.0` -> `20.2.0`,
/// `go1.22.1` -> `1.22.1`, `openjdk version "17.0.15" 2025-04-15` -> `17.0.15`.
pub fn parse_version(output: &str, tool: &str) -> Option<String> {
    let tool = tool.to_ascii_lowercase();
    let output = strip_ansi(output);
    let lines: Vec<&str> = output.lines().take(10).collect();
    let naming = lines
        .iter()
        .filter(|l| l.to_ascii_lowercase().contains(&tool))
        .find_map(|l| version_in_line(l));
    naming.or_else(|| lines.iter().find_map(|l| version_in_line(l)))
}

/// Removes terminal escape sequences (`ESC [ ... letter`) some tools print
/// even to a pipe, and any other control character but newlines.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if c == '\n' || !c.is_control() {
            out.push(c);
        }
    }
    out
}

fn version_in_line(line: &str) -> Option<String> {
    {
        line.split_whitespace().find_map(|word| {
            let word = word.trim_matches(|c: char| matches!(c, '"' | '\'' | ',' | '(' | ')' | ';'));
            let digits = word.trim_start_matches(|c: char| c.is_ascii_alphabetic());
            let looks_like_version = digits.starts_with(|c: char| c.is_ascii_digit())
                && digits.contains('.')
                && digits
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'));
            // A date (2025-04-15) is not a version.
            let is_date =
                digits.len() == 10 && digits.matches('-').count() == 2 && !digits.contains('.');
            (looks_like_version && !is_date && digits.len() <= 64).then(|| digits.to_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_found_in_real_outputs() {
        let cases = [
            ("Python 3.11.7", "3.11.7"),
            ("v20.20.2", "20.20.2"),
            ("go version go1.22.1 linux/amd64", "1.22.1"),
            (
                "openjdk version \"17.0.15\" 2025-04-15\nOpenJDK Runtime",
                "17.0.15",
            ),
            ("Docker version 28.2.2, build e6534b4", "28.2.2"),
            ("cargo 1.95.0 (f2d3ce0bd 2026-03-21)", "1.95.0"),
            ("2.1.197 (Claude Code)", "2.1.197"),
            ("psql (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)", "15.18"),
            (
                "Client Version: v1.30.2\nKustomize Version: v5.0.4",
                "1.30.2",
            ),
        ];
        for (output, want) in cases {
            assert_eq!(
                parse_version(output, "x").as_deref(),
                Some(want),
                "{output}"
            );
        }
        assert_eq!(parse_version("no version here", "x"), None);
        let maven = "\u{1b}[1mApache Maven 3.8.7\u{1b}[m\nJava version: 17.0.15\n";
        assert_eq!(parse_version(maven, "maven").as_deref(), Some("3.8.7"));
    }

    #[test]
    fn plan_hides_and_extends() {
        let extra = vec![
            Probe::new("deno", &["deno", "--version"]),
            Probe::new("node", &["nodejs", "-v"]),
        ];
        let probes = plan(&["docker".into()], &extra);
        assert!(probes.iter().all(|p| p.name != "docker"));
        assert!(probes.iter().any(|p| p.name == "deno"));
        let node: Vec<_> = probes.iter().filter(|p| p.name == "node").collect();
        assert_eq!(node.len(), 1);
        assert_eq!(node[0].command, vec!["nodejs", "-v"]);
    }

    #[tokio::test]
    async fn detect_runs_real_processes_and_skips_missing_tools() {
        let probes = vec![
            Probe::new("sh", &["sh", "-c", "echo 'sh 5.2.15'"]),
            Probe::new("missing", &["definitely-not-installed-ccc", "--version"]),
            Probe::new("slow", &["sh", "-c", "sleep 5; echo 1.0.0"]),
        ];
        let found = detect(probes, Duration::from_millis(500)).await;
        assert_eq!(
            found,
            vec![Toolchain {
                name: "sh".into(),
                version: "5.2.15".into()
            }]
        );
    }
}
