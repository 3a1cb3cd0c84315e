//! Git fixtures: real bare repositories made with the `git` command, as a
//! remote for agents to fetch from and push to.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=fixture",
            "-c",
            "user.email=fixture@localhost",
        ])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "protocol.file.allow=always",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git is installed (`make test` installs it)");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bare repository `name.git` in `dir` whose `main` has one commit with
/// `files` (path, contents).
pub fn bare_repo(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = &std::path::absolute(dir).expect("absolute path");
    let bare = dir.join(format!("{name}.git"));
    let seed = dir.join(format!("{name}-seed"));
    std::fs::create_dir_all(&bare).expect("mkdir");
    git(&bare, &["init", "--bare", "-q"]);
    git(
        dir,
        &[
            "clone",
            "-q",
            bare.to_str().expect("utf-8"),
            seed.to_str().expect("utf-8"),
        ],
    );
    for (path, contents) in files {
        let file = seed.join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(file, contents).expect("write");
    }
    git(&seed, &["add", "-A"]);
    git(&seed, &["commit", "-q", "-m", "initial"]);
    git(&seed, &["push", "-q", "origin", "HEAD:main"]);
    bare
}

/// Makes the remote refuse every push, with a message.
pub fn reject_pushes(bare: &Path) {
    let hook = bare.join("hooks").join("pre-receive");
    std::fs::write(&hook, "#!/bin/sh\necho 'pushes are frozen' >&2\nexit 1\n").expect("hook");
    Command::new("chmod")
        .arg("+x")
        .arg(&hook)
        .status()
        .expect("chmod");
}

/// The files of `branch` in the remote, or `None` if it has no such branch.
pub fn branch_files(bare: &Path, branch: &str) -> Option<Vec<String>> {
    let out = Command::new("git")
        .args(["ls-tree", "-r", "--name-only", branch])
        .current_dir(bare)
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    })
}

/// The commit message of `branch`'s tip.
pub fn tip_message(bare: &Path, branch: &str) -> String {
    git(bare, &["log", "-1", "--format=%B", branch])
}

/// A `git daemon` serving `base` over git:// on loopback with pushes
/// enabled: a real smart-protocol remote, whose hooks run (a local path
/// remote is written directly and runs none).
pub struct Daemon {
    pub port: u16,
    child: std::process::Child,
}

impl Daemon {
    pub fn start(base: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new("git")
            .args([
                "daemon",
                "--export-all",
                "--enable=receive-pack",
                "--reuseaddr",
            ])
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own group: the daemon forks, and all of it goes at drop.
            .process_group(0)
            .spawn()
            .expect("git daemon");
        crate::process::eventually(std::time::Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .expect("git daemon listens");
        Self { port, child }
    }

    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

/// A git server on loopback that accepts connections and never answers: a
/// stalled network, for timeouts.
pub struct SilentServer {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilentServer {
    pub fn start() -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                held.extend(conn.ok());
            }
        });
        Self { port, stop }
    }

    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
