//! Whether this PC's Claude Code CLI can work: which program it is, that it
//! runs (`claude --version`), and that it is logged in (`claude auth
//! status`, which reads the local credentials and spends no tokens).
//!
//! At start the CLI is resolved to an absolute path once, and every attempt
//! runs that path: a relative path with a slash is taken from the directory
//! the agent was started in, a bare name is looked up on PATH. A CLI that
//! is missing or does not run is an error at start. Later, a failure that
//! is the PC's fault (the CLI gone, not logged in, an invalid API key) makes
//! the agent unhealthy; the driver then runs [`check`] again at the
//! configured interval, and a pass clears the reason. `auth status` does
//! not prove an API key valid (that costs a request): a key the API refuses
//! is found by the next attempt after the interval, which costs no attempt
//! either (it ends as an agent fault).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::debug;

use crate::runner;

/// How long `claude --version` and `claude auth status` may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Claude Code CLI {program:?} is not on PATH (looked in {searched})")]
    NotOnPath { program: String, searched: String },
    #[error("the Claude Code CLI {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("the Claude Code CLI {} is not an executable file", path.display())]
    NotExecutable { path: PathBuf },
    #[error("the Claude Code CLI {} does not run: `--version` {why}", path.display())]
    Broken { path: PathBuf, why: String },
}

/// The CLI's absolute path: `program` as given when absolute, taken from
/// `start_dir` when relative with a slash, else looked up on `path_var`.
pub fn resolve(
    program: &str,
    start_dir: &Path,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, Error> {
    let candidate = if program.contains('/') {
        let path = start_dir.join(program);
        std::path::absolute(&path).unwrap_or(path)
    } else {
        let dirs: Vec<PathBuf> = path_var
            .map(|p| std::env::split_paths(p).collect())
            .unwrap_or_default();
        return dirs
            .iter()
            .filter(|d| d.is_absolute())
            .map(|d| d.join(program))
            .find(|p| is_executable(p))
            .ok_or_else(|| Error::NotOnPath {
                program: program.to_owned(),
                searched: if dirs.is_empty() {
                    "an empty PATH".to_owned()
                } else {
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                },
            });
    };
    if !candidate.exists() {
        return Err(Error::Missing { path: candidate });
    }
    if !is_executable(&candidate) {
        return Err(Error::NotExecutable { path: candidate });
    }
    Ok(candidate)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `claude --version`; the version it prints.
pub async fn version(path: &Path, env: &[(String, String)]) -> Result<String, Error> {
    let broken = |why: String| Error::Broken {
        path: path.to_owned(),
        why,
    };
    let program = path.to_string_lossy();
    let args = crate::claude::VERSION_ARGS.map(str::to_owned);
    let out = runner::run_captured(&program, &args, env, None, CHECK_TIMEOUT)
        .await
        .map_err(|e| broken(e.to_string()))?;
    let version = crate::toolchains::parse_version(&out.stdout, "claude");
    match version {
        Some(v) if out.success => Ok(v),
        _ => Err(broken(format!(
            "failed: {}",
            first_line(&out.stderr)
                .or_else(|| first_line(&out.stdout))
                .unwrap_or("no output")
        ))),
    }
}

/// Whether the CLI is logged in, from `claude auth status` (JSON with
/// `loggedIn`). Output it does not understand (a CLI without the command)
/// counts as logged in: the next attempt tells.
pub async fn logged_in(path: &Path, env: &[(String, String)]) -> Result<(), String> {
    let program = path.to_string_lossy();
    let args = crate::claude::AUTH_STATUS_ARGS.map(str::to_owned);
    let out = runner::run_captured(&program, &args, env, None, CHECK_TIMEOUT)
        .await
        .map_err(|e| format!("cannot ask the CLI whether it is logged in: {e}"))?;
    match crate::claude::logged_in(&out.stdout) {
        Some(true) => Ok(()),
        Some(false) => Err(format!(
            "the CLI {} is not logged in on this PC (claude auth status: loggedIn false); run `claude auth login` or set ANTHROPIC_API_KEY",
            path.display()
        )),
        None => {
            debug!(stdout = %out.stdout, "`claude auth status` said nothing usable");
            Ok(())
        }
    }
}

/// The whole check, as run while the agent is unhealthy: the CLI still
/// exists, runs, and is logged in. `Err` is the reason to advertise.
pub async fn check(path: &Path, env: &[(String, String)]) -> Result<(), String> {
    if !is_executable(path) {
        return Err(if path.exists() {
            Error::NotExecutable {
                path: path.to_owned(),
            }
        } else {
            Error::Missing {
                path: path.to_owned(),
            }
        }
        .to_string());
    }
    version(path, env).await.map_err(|e| e.to_string())?;
    logged_in(path, env).await
}

fn first_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).find(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ccc-health-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).expect("scratch dir");
        dir
    }

    fn script(path: &Path, body: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[tokio::test]
    async fn the_cli_is_resolved_once_and_checked_for_real() {
        let dir = scratch("resolve");
        let cli = dir.join("bin").join("claude");
        script(
            &cli,
            "case \"$1\" in --version) echo '2.1.332 (Claude Code)';; auth) echo '{\"loggedIn\": false}'; exit 1;; esac",
            0o755,
        );
        // A relative path with a slash: from the start directory.
        let found = resolve("bin/claude", &dir, None).expect("relative");
        assert_eq!(found, cli);
        // A bare name: on PATH, skipping directories without it.
        let path = std::env::join_paths([dir.join("nowhere"), dir.join("bin")]).expect("PATH");
        assert_eq!(
            resolve("claude", Path::new("/"), Some(&path)).expect("on PATH"),
            cli
        );
        let err = resolve("claude", &dir, Some(OsStr::new("/nonexistent-dir"))).expect_err("fails");
        assert!(err.to_string().contains("/nonexistent-dir"), "{err}");
        let err = resolve("./bin/gone", &dir, None).expect_err("fails");
        assert!(
            err.to_string()
                .contains(&dir.join("bin/gone").display().to_string()),
            "{err}"
        );

        assert_eq!(version(&cli, &[]).await.expect("version"), "2.1.332");
        let not_logged_in = logged_in(&cli, &[]).await.expect_err("fails");
        assert!(not_logged_in.contains("not logged in"), "{not_logged_in}");
        assert_eq!(check(&cli, &[]).await.expect_err("fails"), not_logged_in);

        // The environment the attempts get is the one checked.
        script(
            &cli,
            "case \"$1\" in --version) echo '2.1.332 (Claude Code)';; auth) echo \"{\\\"loggedIn\\\": ${LOGGED:-false}}\";; esac",
            0o755,
        );
        check(&cli, &[("LOGGED".into(), "true".into())])
            .await
            .expect("logged in with the CLI's environment");

        script(&cli, "echo 'segfault' >&2; exit 139", 0o755);
        let broken = version(&cli, &[]).await.expect_err("fails").to_string();
        assert!(
            broken.contains("segfault") && broken.contains(&cli.display().to_string()),
            "{broken}"
        );

        script(&cli, "echo 2.1.332", 0o644);
        let err = resolve(&cli.display().to_string(), &dir, None).expect_err("fails");
        assert!(err.to_string().contains("not an executable"), "{err}");
        assert!(
            check(&cli, &[])
                .await
                .expect_err("fails")
                .contains("not an executable")
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
