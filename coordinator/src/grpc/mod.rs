//! The gRPC adapters, one concern a file:
//!
//! - `auth.rs`: the interceptor in front of both services; it verifies the
//!   caller's certificate (role, and for admins a name that is not revoked)
//!   and puts the identity in the request's extensions.
//! - `gateway.rs`: `AgentGateway`, one bidirectional stream per agent.
//! - `admin.rs`: the `Admin` service.
//! - `watch.rs`: its streams, `WatchTask` and `WatchCluster`.
//! - `convert.rs`: domain values as the Admin API answers them.
//!
//! API boundary: the agent stream's messages are converted (and validated)
//! by `common::protocol`; this module holds no conversion of them. Only this
//! module and `common` see protobuf types.

mod admin;
mod auth;
mod convert;
mod gateway;
mod watch;

use tonic::Status;

pub use admin::Admin;
pub use auth::Authorize;
pub use convert::{task_info, triage_report};
pub use gateway::Gateway;

use crate::driver::DriverGone;

impl From<DriverGone> for Status {
    fn from(e: DriverGone) -> Self {
        Status::unavailable(e.to_string())
    }
}
