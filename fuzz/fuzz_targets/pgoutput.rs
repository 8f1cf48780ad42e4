//! The WAL source's decoder: bytes from the replication stream (pgoutput
//! messages, Herald's logical messages), framed and assembled into events
//! as capture does. Whatever the bytes, an error and never a panic; every
//! event names its table and carries the table tag.
#![no_main]

use bytes::Bytes;
use herald_capture::wal::pgoutput::{WalMessage, frame};
use herald_capture::wal::txn::Assembler;
use herald_core::config::TableConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let table = TableConfig {
        name: "res_users".into(),
        schema: "public".into(),
        table: None,
        id_column: "id".into(),
        key_columns: vec!["slug".into()],
        tenant_column: Some("tenant_id".into()),
        team_column: Some("team_id".into()),
        watch_columns: Vec::new(),
    };
    let mut assembler = Assembler::new(&[table], "db", 3, 5);
    // Messages separated by a one-byte length.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (message, tail) = tail.split_at(len);
        rest = tail;
        let Ok(message) = frame(Bytes::copy_from_slice(message)) else { continue };
        let events = match message {
            WalMessage::Begin { final_lsn, xid, commit_time_us } => {
                assembler.begin(final_lsn, xid, commit_time_us);
                continue;
            }
            WalMessage::Change(data) => {
                let _ = assembler.change(&data);
                if !assembler.over_bound() {
                    continue;
                }
                assembler.flush(0)
            }
            WalMessage::Message { prefix, content, .. } => {
                let _ = assembler.message(&prefix, &content);
                continue;
            }
            WalMessage::Commit { .. } => assembler.commit(0),
            WalMessage::KeepAlive { .. } => continue,
        };
        for event in events.events {
            assert_eq!(event.table, "res_users");
            assert!(event.tags.iter().any(|t| t == "res_users"));
            assert!(event.ids.len() <= 3);
        }
    }
});
