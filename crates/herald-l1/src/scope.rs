//! Tenant ids, scopes and tags: whose data a cache entry or an invalidation
//! belongs to. Shared by the L1 cache, near caches and herald-core's key
//! layout (`herald_core::keys`, which re-exports these).

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Longest tenant id, in bytes.
pub const MAX_TENANT_LEN: usize = 64;

/// Checks an SQL identifier from configuration: `[a-z_][a-z0-9_]*`, at most
/// 63 bytes. Identifiers are also quoted where they are used.
pub fn validate_identifier(s: &str) -> std::result::Result<(), String> {
    let mut chars = s.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !ok_first || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') || s.len() > 63 {
        return Err(format!("{s:?} is not a valid identifier (lowercase letters, digits and _, at most 63 bytes)"));
    }
    Ok(())
}

/// A validated tenant id: 1 to 64 of `A-Z a-z 0-9 _ - .`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    pub fn new(s: &str) -> Result<Self> {
        if s.is_empty() || s.len() > MAX_TENANT_LEN {
            return Err(Error::invalid("tenant id", format!("must be 1 to {MAX_TENANT_LEN} bytes")));
        }
        if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
            return Err(Error::invalid("tenant id", format!("character {c:?} is not allowed")));
        }
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whose data a key or tag belongs to: one tenant, or the explicit global
/// namespace (tables without a tenant column).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Tenant(TenantId),
    Global,
}

impl Scope {
    /// The scope of an event's tenant field: empty means global.
    pub fn from_event_tenant(tenant: &str) -> Result<Self> {
        if tenant.is_empty() { Ok(Scope::Global) } else { TenantId::new(tenant).map(Scope::Tenant) }
    }
}

/// A tag within a scope: what cache entries are indexed by and what events
/// invalidate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagKey {
    pub scope: Scope,
    pub tag: Arc<str>,
}

impl TagKey {
    pub fn new(scope: Scope, tag: impl Into<Arc<str>>) -> Self {
        Self { scope, tag: tag.into() }
    }
}
