//! Generated protobuf and gRPC code for Herald's contracts (`proto/herald/v1`).

/// `herald.v1`: invalidation events and the L1 channel messages.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("herald.v1");
}

pub use prost::Message;
