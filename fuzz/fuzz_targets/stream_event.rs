//! The stream event: broadcast's decode and validation of a stream entry's
//! `e` field (bytes capture wrote, or anyone with access to the stream), and
//! what broadcast derives from a decoded event before it touches Redis:
//! the scope, team channels and idempotency keys, the L1 message.
#![no_main]

use bytes::Bytes;
use herald_broadcast::apply::decode;
use herald_core::channel::{Channel, validate_idempotency_key};
use herald_core::keys::{Scope, TenantId};
use herald_core::stream::Entry;
use herald_proto::Message as _;
use herald_proto::v1::{InvalidationBatch, InvalidationEvent, L1Message, l1_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The raw protobuf decoder, on its own.
    let raw = InvalidationEvent::decode(data);

    let entry = Entry { id: "1-0".into(), payload: Some(Bytes::copy_from_slice(data)) };
    let Ok(event) = decode(&entry) else { return };
    assert!(raw.is_ok(), "broadcast accepted what prost refused");
    assert!(!event.table.is_empty() && !event.tags.is_empty(), "an accepted event names a table and tags");

    // Re-encoding a decoded event and decoding it again gives the same event.
    let again = InvalidationEvent::decode(event.encode_to_vec().as_slice()).expect("re-encoded event decodes");
    assert_eq!(again, event);

    let _ = event.operation().as_str_name();
    let _ = Scope::from_event_tenant(&event.tenant);
    if let Ok(tenant) = TenantId::new(&event.tenant) {
        assert_eq!(tenant.as_str(), event.tenant);
        for team in &event.teams {
            if let Ok(channel) = Channel::parse(&format!("team:{team}")) {
                assert_eq!(channel.namespace(), "team");
                assert_eq!(channel.id(), team);
            }
            let _ = validate_idempotency_key(&format!("ev:{}:team:{team}", event.event_id));
        }
    }

    // The L1 message broadcast publishes decodes back to the event.
    let message =
        L1Message { body: Some(l1_message::Body::Invalidations(InvalidationBatch { events: vec![event.clone()] })) };
    let back = L1Message::decode(message.encode_to_vec().as_slice()).expect("l1 message decodes");
    assert_eq!(back, message);
});
