//! Herald's Rust near cache: cache-api's answers kept in the application's
//! RAM, coherent through cache-api's `Watch` stream (docs/near-cache.md).
//!
//! ```no_run
//! # async fn example() -> herald_client::Result<()> {
//! use herald_client::{NearCache, NearConfig};
//!
//! let config = NearConfig::new("http://127.0.0.1:50051", "app-token-0123456789", &["acme"]);
//! let cache = NearCache::connect(config)?;
//! let user: Option<serde_json::Value> = cache.get_resource("acme", "user_by_slug", &["alice"]).await?;
//! # Ok(()) }
//! ```
//!
//! Guarantees: a hit is served from RAM only while the stream is live
//! (`Ready` received, every seq in order, heartbeats on time, same
//! generation); any doubt flushes everything and reads go to cache-api until
//! the stream is live again. An answer is stored only under the fill rule
//! (ticket before the request, same node and generation, no event for its
//! tags since), so a fill that raced with an invalidation is never kept.

pub mod client;
pub mod config;
pub mod error;
pub mod feed;
pub mod state;

pub use client::{NearCache, Target};
pub use config::NearConfig;
pub use error::{Error, Result};
