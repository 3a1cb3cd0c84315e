//! Child processes. Architecture invariant: the agent spawns processes only
//! through this module, always with an argument vector (never a shell),
//! stdin closed, and a deadline.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{program} not found")]
    NotFound { program: String },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?}")]
    TimedOut { program: String, timeout: Duration },
}

/// What a short-lived command printed.
#[derive(Debug)]
pub struct Captured {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args...` to completion, capturing its output, killing it
/// if it outlives `timeout`.
pub async fn run_captured(
    program: &str,
    args: &[String],
    cwd: Option<&Path>,
    timeout: Duration,
) -> Result<Captured, Error> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                program: program.to_owned(),
            }
        } else {
            Error::Spawn {
                program: program.to_owned(),
                source,
            }
        }
    })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Captured {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(source)) => Err(Error::Spawn {
            program: program.to_owned(),
            source,
        }),
        // Dropping the future drops the child, which kills it.
        Err(_) => Err(Error::TimedOut {
            program: program.to_owned(),
            timeout,
        }),
    }
}
