//! What every Herald service shares: configuration, tenant and key types,
//! Redis and Postgres connection set-up, telemetry, shutdown, the ops HTTP
//! endpoints and the L1 cache with its invalidation subscriber.

pub mod channel;
pub mod config;
pub mod error;
pub mod grpc;
pub mod hash;
pub mod keys;
pub mod l1;
pub mod l2;
pub mod ops;
pub mod pg;
pub mod redis;
pub mod serve;
pub mod shutdown;
pub mod stream;
pub mod telemetry;
pub mod time;

pub use error::{Error, Result};
/// Reconnect backoff (owned by herald-l1, shared with near caches).
pub use herald_l1::backoff;
/// What tags mean (owned by herald-l1, which embeds without the rest of core).
pub use herald_l1::tags;
