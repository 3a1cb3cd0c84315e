//! The generated `ccc.v1` protocol. Generated code only: conversions to domain
//! types live in [`crate::protocol`].

#![allow(clippy::all, clippy::unwrap_used, missing_docs)]

tonic::include_proto!("ccc.v1");

/// The encoded descriptors of `ccc.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ccc_descriptor");
