//! What a subscribe reads from Redis: the channel's position first, then —
//! only when the client recovers with the channel's epoch and history can
//! reach back to its offset — the publications it missed, page by page and
//! at most `max_bytes` of them (more could not be queued for the socket
//! anyway). A wrong epoch or a position history no longer covers costs one
//! small read, whatever `history_size` is.

use fred::prelude::Pool;
use herald_core::channel::{self, Channel, Publication};
use herald_core::keys::{KeySpace, TenantId};

use crate::protocol::Position;

/// Publications read per history page.
const PAGE: u64 = 256;

/// A channel's position and what a recovering client missed.
#[derive(Debug, Default)]
pub struct Read {
    /// The channel's epoch; `None` when it has no state.
    pub epoch: Option<String>,
    /// The channel's latest offset when the position was read.
    pub head: u64,
    /// `None` without `recover`; else whether `publications` are exactly
    /// everything after the client's position up to `head`.
    pub recovered: Option<bool>,
    /// The missed publications, oldest first (empty unless recovered).
    pub publications: Vec<Publication>,
    /// Publications read from history (for the metric).
    pub read: u64,
}

/// Reads the position of `channel`, and with `recover` what was missed.
pub async fn read(
    redis: &Pool,
    keys: &KeySpace,
    tenant: &TenantId,
    channel: &Channel,
    recover: Option<&Position>,
    history_size: u64,
    max_bytes: usize,
) -> herald_core::Result<Read> {
    let position = channel::history_since(redis, keys, tenant, channel, 0, 0).await?;
    let mut read = Read { epoch: position.epoch, head: position.offset, ..Read::default() };
    let Some(from) = recover else { return Ok(read) };
    let reachable = read.epoch.as_deref() == Some(from.epoch.as_str())
        && from.offset <= read.head
        && read.head - from.offset <= history_size;
    if !reachable {
        read.recovered = Some(false);
        return Ok(read);
    }
    let mut since = from.offset;
    let mut bytes = 0;
    while since < read.head {
        let page = channel::history_since(redis, keys, tenant, channel, since, PAGE.min(read.head - since)).await?;
        read.read += page.publications.len() as u64;
        // A new epoch, or history trimmed past `since` meanwhile: the
        // missed publications are no longer all there.
        if page.epoch != read.epoch || page.publications.is_empty() {
            read.recovered = Some(false);
            read.publications.clear();
            return Ok(read);
        }
        for p in page.publications {
            if p.offset > read.head {
                break;
            }
            bytes += p.data.len();
            if p.offset != since + 1 || bytes > max_bytes {
                read.recovered = Some(false);
                read.publications.clear();
                return Ok(read);
            }
            since = p.offset;
            read.publications.push(p);
        }
    }
    read.recovered = Some(true);
    Ok(read)
}
