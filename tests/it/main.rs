//! The one integration-test binary: real binaries, real mTLS, real sled
//! files, over loopback. See `tests/src` for the harness.

mod agent_health;
mod demo;
mod docs;
mod executor;
mod fakes;
mod foundation;
mod github_in;
mod github_out;
mod hardening;
mod logs;
mod metrics;
mod operator;
mod raw_stream;
mod real_cli;
mod sim;
mod tasks;
mod top;
mod triage;
