//! Processes, directories and waiting.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries (`target/debug`), found
/// from the running executable (`target/debug/deps/it-...` or
/// `target/debug/demo`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a workspace binary; panics with the fix if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which `make test` does)",
        path.display()
    );
    path
}

/// A fresh directory, removed on drop unless `KEEP_TEST_DIRS=1` or the
/// thread is panicking (then its path is printed).
pub struct TestDir {
    path: PathBuf,
    keep: bool,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "ccc-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create test dir");
        Self { path, keep: false }
    }

    /// A directory that is emptied now and kept afterwards (the demo's).
    pub fn persistent(path: PathBuf) -> Self {
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create dir");
        Self { path, keep: true }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if std::thread::panicking() || std::env::var_os("KEEP_TEST_DIRS").is_some() {
            eprintln!("kept test dir {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process whose stdout and stderr go to one log file. Killed on drop.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log file");
        let err = out.try_clone().expect("clone log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env("RUST_LOG", "info")
            .env_remove("CCC_CONFIG");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns the line holding it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let found = eventually(timeout, || {
            self.log_text()
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_owned)
                .ok_or_else(|| format!("{} has not logged {needle:?}", self.name))
        });
        found.unwrap_or_else(|e| panic!("{e}\n--- {} log ---\n{}", self.name, self.log_text()))
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.wait_exit(timeout)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        eventually(timeout, || {
            self.child
                .try_wait()
                .ok()
                .flatten()
                .ok_or_else(|| "still running".to_owned())
        })
        .ok()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The end of each log is what explains a failure; the whole
            // log stays in the kept test directory.
            const TAIL_LINES: usize = 40;
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- {} log, last {} of {} lines ({}) ---\n{}",
                self.name,
                TAIL_LINES.min(lines.len()),
                lines.len(),
                self.log.display(),
                lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Retries `check` until it succeeds or `timeout` passes; returns the last
/// error on timeout. Polls from every 20 ms backing off to every 150 ms:
/// waiting on a condition, never a fixed sleep.
#[allow(clippy::disallowed_methods)]
pub fn eventually<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    // Checks often spawn a process; polling backs off so that a long wait
    // does not itself load the machine it waits on.
    let mut pause = Duration::from_millis(20);
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("not true after {timeout:?}: {e}"));
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(150));
            }
        }
    }
}
