//! The L1 channel's wire format, in one place: what broadcast and the cache
//! API publish on `herald:{env}:l1` (or, with `redis.partitions` > 1, on
//! the L1 channel of each event's partition), and what every L1 subscriber
//! (and `herald-broadcast watch`) reads back. On a cluster they travel by
//! sharded pub/sub (`SPUBLISH`). A message is a protobuf
//! `herald.v1.L1Message`: a batch of invalidation events, a broadcast
//! heartbeat, or a freshness watermark broadcast forwards once everything
//! before it in its partition was applied.

use bytes::Bytes;
use fred::prelude::*;
use herald_proto::Message as _;
use herald_proto::v1::{Heartbeat, InvalidationBatch, InvalidationEvent, L1Message, Watermark, l1_message};

use crate::time::now_us;

/// Largest L1 message Herald publishes; larger batches are split.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// What an L1 message says.
#[derive(Debug)]
pub enum Received {
    Invalidations(Vec<InvalidationEvent>),
    Heartbeat(Heartbeat),
    /// Every invalidation up to the watermark's position was published on
    /// the channel before it.
    Watermark(Watermark),
    /// A message of a newer kind: nothing to do.
    Unknown,
}

/// Decodes one message. An error means the reader cannot know what it
/// invalidated, and must flush.
pub fn decode(bytes: &[u8]) -> Result<Received, herald_proto::DecodeError> {
    Ok(match L1Message::decode(bytes)?.body {
        Some(l1_message::Body::Invalidations(batch)) => Received::Invalidations(batch.events),
        Some(l1_message::Body::Heartbeat(heartbeat)) => Received::Heartbeat(heartbeat),
        Some(l1_message::Body::Watermark(watermark)) => Received::Watermark(watermark),
        None => Received::Unknown,
    })
}

/// `events` as messages of at most [`MAX_MESSAGE_BYTES`] (a single larger
/// event goes alone), in order.
pub fn invalidation_messages(events: &[InvalidationEvent]) -> Vec<Bytes> {
    let mut messages = Vec::new();
    let mut batch: Vec<InvalidationEvent> = Vec::new();
    let mut size = 0;
    for event in events {
        let len = event.encoded_len();
        if !batch.is_empty() && size + len > MAX_MESSAGE_BYTES {
            messages.push(encode_batch(std::mem::take(&mut batch)));
            size = 0;
        }
        size += len;
        batch.push(event.clone());
    }
    if !batch.is_empty() {
        messages.push(encode_batch(batch));
    }
    messages
}

fn encode_batch(events: Vec<InvalidationEvent>) -> Bytes {
    let message = L1Message { body: Some(l1_message::Body::Invalidations(InvalidationBatch { events })) };
    message.encode_to_vec().into()
}

/// A heartbeat of broadcast instance `instance`, sent now.
pub fn heartbeat_message(instance: &str) -> Bytes {
    let heartbeat = Heartbeat { instance: instance.to_string(), sent_time_us: now_us() };
    L1Message { body: Some(l1_message::Body::Heartbeat(heartbeat)) }.encode_to_vec().into()
}

/// A watermark message.
pub fn watermark_message(watermark: Watermark) -> Bytes {
    L1Message { body: Some(l1_message::Body::Watermark(watermark)) }.encode_to_vec().into()
}

/// Publishes `watermark` on the L1 `channel`. Only broadcast may, and only
/// once every stream entry before the watermark was applied.
pub async fn publish_watermark(redis: &Pool, channel: &str, watermark: Watermark) -> crate::Result<()> {
    let _: i64 = redis.next().publish(channel, watermark_message(watermark)).await?;
    Ok(())
}

/// Publishes `events` on the L1 `channel`, in order.
pub async fn publish_invalidations(redis: &Pool, channel: &str, events: &[InvalidationEvent]) -> crate::Result<()> {
    for message in invalidation_messages(events) {
        crate::redis::publish(redis.next(), channel, message).await?;
    }
    Ok(())
}

/// Publishes a heartbeat of `instance` on the L1 `channel`.
pub async fn publish_heartbeat(redis: &Pool, channel: &str, instance: &str) -> crate::Result<()> {
    crate::redis::publish(redis.next(), channel, heartbeat_message(instance)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, tag_bytes: usize) -> InvalidationEvent {
        InvalidationEvent { event_id: id.into(), tags: vec!["x".repeat(tag_bytes)], ..Default::default() }
    }

    #[test]
    fn what_is_published_decodes_to_the_same_events_in_order() {
        let events: Vec<_> = (0..5).map(|i| event(&i.to_string(), 400_000)).collect();
        let messages = invalidation_messages(&events);
        assert!(messages.len() > 1, "a batch over the limit is split");
        assert!(messages.iter().all(|m| m.len() <= MAX_MESSAGE_BYTES + 16));
        let decoded: Vec<InvalidationEvent> = messages
            .iter()
            .flat_map(|m| match decode(m).unwrap() {
                Received::Invalidations(events) => events,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(decoded, events);
        assert!(invalidation_messages(&[]).is_empty());
    }

    #[test]
    fn heartbeats_round_trip_and_junk_is_an_error() {
        match decode(&heartbeat_message("b-1")).unwrap() {
            Received::Heartbeat(hb) => assert_eq!(hb.instance, "b-1"),
            other => panic!("{other:?}"),
        }
        let watermark = Watermark { lsn: 7, pg_time_us: 9 };
        match decode(&watermark_message(watermark)).unwrap() {
            Received::Watermark(w) => assert_eq!(w, watermark),
            other => panic!("{other:?}"),
        }
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(matches!(decode(&[]).unwrap(), Received::Unknown));
    }
}
