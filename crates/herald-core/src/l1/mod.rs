//! The L1 cache of a service: the cache itself is `herald-l1` (re-exported
//! here, so services import it from one place); what needs Redis stays here:
//! the L1 channel's wire format ([`wire`]) and the subscriber that feeds the
//! cache from it ([`subscriber`]).

pub mod subscriber;
pub mod wire;

pub use herald_l1::{Applied, FillTicket, Hit, L1Cache, L1Metrics, Position};
