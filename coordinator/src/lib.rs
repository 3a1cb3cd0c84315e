//! The coordinator: accepts agents over mTLS, remembers them in sled, and
//! lets admins inspect and steer the cluster.

pub mod core;
pub mod store;
