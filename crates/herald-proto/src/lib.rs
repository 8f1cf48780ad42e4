//! Generated protobuf and gRPC code for Herald's contracts (`proto/herald/v1`).

/// `herald.v1`: invalidation events, the L1 channel messages and the cache API.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("herald.v1");
}

mod descriptors;

pub use descriptors::service_descriptor_set;
pub use prost::{DecodeError, Message};

/// Every `herald.v1` descriptor, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("herald_descriptor");
