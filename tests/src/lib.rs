//! The harness shared by the integration tests (`tests/it`) and `make demo`:
//! it runs the real binaries from the target directory on loopback, each
//! with its own temporary directory, PKI, ports and log files.
//!
//! Patterned on local cluster runners: binaries found next to the test
//! executable, one log file per process, readiness by waiting for a log
//! line, `KEEP_TEST_DIRS=1` keeps every directory, and a failing test dumps
//! every process's log.

// GitHub's repository JSON is one large `json!` literal.
#![recursion_limit = "512"]

pub mod bench;
pub mod cluster;
pub mod fake_anthropic;
pub mod git;
pub mod git_http;
pub mod github;
pub mod http;
pub mod npm;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod smee;
pub mod sshd;
pub mod webhooks;

pub use cluster::{Cluster, Pki};
pub use process::{Process, TestDir, bin, eventually};
