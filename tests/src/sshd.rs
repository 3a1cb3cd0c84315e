//! A real OpenSSH server on loopback for git over SSH: its own host key, a
//! user key pair and an authorized_keys made by the test with ssh-keygen,
//! and a known_hosts that trusts exactly this server; nothing from the
//! user's ~/.ssh is read or written. The git commands run as the user the
//! tests run as. `make test` installs openssh-server where it is missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where Debian puts sshd; it must be started by its absolute path.
const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    pub port: u16,
    /// The user the server lets in (the one running the tests).
    pub user: String,
    /// The private key of that user, for the agent.
    pub user_key: PathBuf,
    /// A known_hosts file holding this server's host key.
    pub known_hosts: PathBuf,
    /// A known_hosts file that holds another key for this server.
    pub wrong_known_hosts: PathBuf,
    child: Child,
    log: PathBuf,
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ccc-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen is installed (`make test` installs openssh-client)");
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

impl Sshd {
    /// Starts sshd in `dir` (keys, config and log go there).
    pub fn start(dir: &Path) -> Self {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: `make test` installs openssh-server"
        );
        std::fs::create_dir_all(dir).expect("sshd dir");
        let dir = std::path::absolute(dir).expect("absolute");
        let host_key = dir.join("host_ed25519");
        let other_host_key = dir.join("other_host_ed25519");
        let user_key = dir.join("user_ed25519");
        for key in [&host_key, &other_host_key, &user_key] {
            keygen(key);
        }
        let authorized = dir.join("authorized_keys");
        std::fs::write(&authorized, read(&user_key.with_extension("pub"))).expect("authorized");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let entry = |key: &Path| {
            let public = read(&key.with_extension("pub"));
            let mut fields = public.split_whitespace();
            format!(
                "[127.0.0.1]:{port} {} {}\n",
                fields.next().expect("key type"),
                fields.next().expect("key")
            )
        };
        let known_hosts = dir.join("known_hosts");
        std::fs::write(&known_hosts, entry(&host_key)).expect("known_hosts");
        let wrong_known_hosts = dir.join("wrong_known_hosts");
        std::fs::write(&wrong_known_hosts, entry(&other_host_key)).expect("known_hosts");
        // The session's PATH must reach git-upload-pack and git-receive-pack
        // wherever git is installed.
        let git_dir = Command::new("git")
            .arg("--exec-path")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let path = format!(
            "{git_dir}:{}",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\n\
                 ListenAddress 127.0.0.1\n\
                 HostKey {host}\n\
                 PidFile {pid}\n\
                 AuthorizedKeysFile {authorized}\n\
                 StrictModes no\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UsePAM no\n\
                 PermitRootLogin prohibit-password\n\
                 SetEnv PATH={path}\n\
                 LogLevel VERBOSE\n",
                host = host_key.display(),
                pid = dir.join("sshd.pid").display(),
                authorized = authorized.display(),
            ),
        )
        .expect("sshd_config");
        // The privilege-separation directory sshd insists on.
        let _ = std::fs::create_dir_all("/run/sshd");
        let log = dir.join("sshd.log");
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("sshd log")))
            .spawn()
            .expect("start sshd");
        let mut sshd = Self {
            port,
            user: whoami(),
            user_key,
            known_hosts,
            wrong_known_hosts,
            child,
            log,
        };
        let up = crate::process::eventually(Duration::from_secs(10), || {
            if let Ok(Some(status)) = sshd.child.try_wait() {
                return Err(format!("sshd exited with {status}"));
            }
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        if let Err(e) = up {
            panic!("sshd did not start: {e}\n{}", sshd.log_text());
        }
        sshd
    }

    /// `ssh://<user>@127.0.0.1:<port><path>` for a repository at `path`.
    pub fn url(&self, path: &Path) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            path.display()
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- sshd log ---\n{}", self.log_text());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `ssh-agent` holding one key, on a socket of its own (never the
/// user's): what `SSH_AUTH_SOCK` points at.
pub struct SshAgent {
    pub socket: PathBuf,
    child: Child,
}

impl SshAgent {
    pub fn start(dir: &Path, key: &Path) -> Self {
        let socket = std::path::absolute(dir)
            .expect("absolute")
            .join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("ssh-agent")
            .args(["-D", "-a"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent is installed (`make test` installs openssh-client)");
        let agent = Self { socket, child };
        crate::process::eventually(Duration::from_secs(10), || {
            if agent.socket.exists() {
                Ok(())
            } else {
                Err("no socket yet".to_owned())
            }
        })
        .expect("ssh-agent listens");
        let out = Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &agent.socket)
            .output()
            .expect("ssh-add");
        assert!(
            out.status.success(),
            "ssh-add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        agent
    }
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
