//! What the two transports share above the [`Cache`]: a Get's target, the
//! one GetMany (bounded in items and in answer size), and InvalidatePrefix's
//! target. `grpc.rs` and `http.rs` only decode requests and render answers.

use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt as _;
use herald_core::keys::TenantId;

use crate::cache::{Answer, Cache, PrefixTarget};
use crate::error::{Error, Result};

/// Most items in one GetMany.
pub const MAX_GET_MANY: usize = 256;
/// GetMany items looked up at once.
const GET_MANY_CONCURRENCY: usize = 32;

/// What a Get reads.
pub enum Target {
    Resource { name: String, params: Vec<String> },
    Key(String),
}

/// A resource or key lookup, shared by Get and GetMany.
pub async fn lookup(cache: &Cache, tenant: &TenantId, target: Target, min_lsn: u64) -> Result<Answer> {
    match target {
        Target::Resource { name, params } => cache.get_resource(tenant, &name, &params, min_lsn).await,
        Target::Key(k) => cache.get_key(tenant, &k, min_lsn).await,
    }
}

/// GetMany: looks `items` up (an item that could not be decoded is its
/// error) and renders each answer with `render`, in order. The rendered
/// answers add up to at most `cache.max_get_many_bytes` as measured by
/// `size`: from the first item that does not fit on, items are answered with
/// a `ResourceExhausted` error, and those not started yet are not looked up.
pub async fn get_many<T>(
    cache: &Cache,
    tenant: &TenantId,
    items: Vec<Result<Target>>,
    min_lsn: u64,
    render: impl Fn(Result<Answer>) -> T,
    size: impl Fn(&T) -> usize,
) -> Result<Vec<T>> {
    if items.len() > MAX_GET_MANY {
        return Err(Error::InvalidArgument(format!("at most {MAX_GET_MANY} items per GetMany, got {}", items.len())));
    }
    let budget = cache.config().max_get_many_bytes;
    let exhausted = || {
        Error::ResourceExhausted(format!(
            "the answer reached the GetMany size limit of {budget} bytes (cache.max_get_many_bytes); \
             ask for this item in another request"
        ))
    };
    let full = AtomicBool::new(false);
    let n = items.len();
    let mut lookups = futures::stream::iter(items)
        .map(|item| {
            let full = &full;
            async move {
                if full.load(Ordering::Relaxed) {
                    return None;
                }
                Some(match item {
                    Ok(target) => lookup(cache, tenant, target, min_lsn).await,
                    Err(e) => Err(e),
                })
            }
        })
        .buffered(GET_MANY_CONCURRENCY);
    let mut out = Vec::with_capacity(n);
    let mut used = 0usize;
    while let Some(result) = lookups.next().await {
        let rendered = match result {
            Some(Err(e)) => render(Err(e)),
            Some(Ok(answer)) if !full.load(Ordering::Relaxed) => {
                let rendered = render(Ok(answer));
                if used + size(&rendered) <= budget {
                    rendered
                } else {
                    full.store(true, Ordering::Relaxed);
                    render(Err(exhausted()))
                }
            }
            _ => render(Err(exhausted())),
        };
        used += size(&rendered);
        out.push(rendered);
    }
    Ok(out)
}

/// InvalidatePrefix's target: exactly one of the three.
pub fn prefix_target(resource: &str, key_prefix: &str, all: bool) -> Result<PrefixTarget> {
    match (resource.is_empty(), key_prefix.is_empty(), all) {
        (false, true, false) => Ok(PrefixTarget::Resource(resource.into())),
        (true, false, false) => Ok(PrefixTarget::KeyPrefix(key_prefix.into())),
        (true, true, true) => Ok(PrefixTarget::All),
        _ => Err(Error::InvalidArgument("give exactly one of resource, key_prefix and all".into())),
    }
}
