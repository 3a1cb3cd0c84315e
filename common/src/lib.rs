//! What both sides of the cluster speak: the generated `ccc.v1` protocol, the
//! agent stream's messages as domain types and their conversion and validation
//! (`protocol`), the other domain types, identity newtypes, the cluster PKI, TLS
//! loading and peer identification, backoff, time and logging setup.
//!
//! Nothing here performs network I/O or holds state: the coordinator and the
//! agent own their event loops; this crate gives them shared vocabulary.

pub mod backoff;
pub mod config;
pub mod ids;
pub mod pki;
pub mod proto;
pub mod protocol;
pub mod repo;
pub mod signal;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod types;
