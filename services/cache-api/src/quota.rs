//! Per-tenant shares of a node's limited resources (database reads, watch
//! streams): each tenant may hold at most `per_tenant` permits at once, so
//! one tenant cannot take a node-wide pool that every tenant needs.
//!
//! A tenant's semaphore exists only while someone holds or waits for one of
//! its permits; the last one out removes it, so the map stays as small as
//! the set of tenants active right now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::keys::TenantId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits per tenant.
#[derive(Clone)]
pub struct TenantQuota {
    inner: Arc<Inner>,
}

struct Inner {
    per_tenant: usize,
    tenants: Mutex<HashMap<TenantId, Arc<Semaphore>>>,
}

/// One of a tenant's permits; given back on drop.
pub struct QuotaPermit {
    inner: Arc<Inner>,
    tenant: TenantId,
    semaphore: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl TenantQuota {
    pub fn new(per_tenant: usize) -> Self {
        Self { inner: Arc::new(Inner { per_tenant, tenants: Mutex::new(HashMap::new()) }) }
    }

    pub fn per_tenant(&self) -> usize {
        self.inner.per_tenant
    }

    /// A permit of `tenant`, waiting at most `wait` for one; `None` when the
    /// tenant still holds all of its permits after that.
    pub async fn acquire(&self, tenant: &TenantId, wait: Duration) -> Option<QuotaPermit> {
        let semaphore = self.semaphore(tenant);
        let permit = tokio::time::timeout(wait, semaphore.clone().acquire_owned()).await.ok()?.ok();
        self.permit(tenant, semaphore, permit)
    }

    /// A permit of `tenant` if one is free now.
    pub fn try_acquire(&self, tenant: &TenantId) -> Option<QuotaPermit> {
        let semaphore = self.semaphore(tenant);
        let permit = semaphore.clone().try_acquire_owned().ok();
        self.permit(tenant, semaphore, permit)
    }

    /// Permits held by `tenant` now.
    pub fn held(&self, tenant: &TenantId) -> usize {
        let tenants = self.inner.tenants.lock().unwrap_or_else(|p| p.into_inner());
        tenants.get(tenant).map_or(0, |s| self.inner.per_tenant - s.available_permits())
    }

    fn semaphore(&self, tenant: &TenantId) -> Arc<Semaphore> {
        let mut tenants = self.inner.tenants.lock().unwrap_or_else(|p| p.into_inner());
        tenants.entry(tenant.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.inner.per_tenant))).clone()
    }

    fn permit(
        &self,
        tenant: &TenantId,
        semaphore: Arc<Semaphore>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Option<QuotaPermit> {
        let permit = QuotaPermit { inner: self.inner.clone(), tenant: tenant.clone(), semaphore, permit };
        // Without a permit, dropping it still removes an idle semaphore.
        permit.permit.is_some().then_some(permit)
    }
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut tenants = self.inner.tenants.lock().unwrap_or_else(|p| p.into_inner());
        // Everyone who holds or waits for this semaphore cloned it under this
        // lock: two references (the map's and ours) mean nobody else does.
        if Arc::strong_count(&self.semaphore) == 2
            && tenants.get(&self.tenant).is_some_and(|s| Arc::ptr_eq(s, &self.semaphore))
        {
            tenants.remove(&self.tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tenants_have_separate_shares_and_idle_tenants_leave_no_trace() {
        let quota = TenantQuota::new(2);
        let (acme, globex) = (TenantId::new("acme").unwrap(), TenantId::new("globex").unwrap());
        let a1 = quota.try_acquire(&acme).unwrap();
        let _a2 = quota.acquire(&acme, Duration::from_millis(10)).await.unwrap();
        assert!(quota.try_acquire(&acme).is_none());
        assert!(quota.acquire(&acme, Duration::from_millis(10)).await.is_none());
        assert!(quota.try_acquire(&globex).is_some());
        assert_eq!((quota.held(&acme), quota.held(&globex)), (2, 0));
        drop(a1);
        assert!(quota.try_acquire(&acme).is_some());
        drop(_a2);
        assert!(quota.inner.tenants.lock().unwrap().is_empty());
    }
}
