//! The capture payload parser: an outbox row (op string and flattened row
//! images, written by the triggers but stored in a table the application
//! role can write) into invalidation events. Besides "no panic", checks
//! that no image is lost: every row id and key value of every image shows
//! up as a tag of an event of that image's tenant.
#![no_main]

use std::collections::HashSet;

use herald_capture::events::{OutboxRow, events_of};
use herald_core::config::TableConfig;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    op: String,
    rows: Vec<Option<String>>,
    key_columns: u8,
    tenant_column: bool,
    team_column: bool,
    chunk_rows: u8,
    database: String,
    id: i64,
    txid: u64,
    commit_lsn: u64,
    traceparent: String,
}

fuzz_target!(|input: Input| {
    let table = TableConfig {
        name: "res_users".into(),
        schema: "public".into(),
        table: None,
        id_column: "id".into(),
        key_columns: (0..input.key_columns % 4).map(|i| format!("k{i}")).collect(),
        tenant_column: input.tenant_column.then(|| "tenant_id".into()),
        team_column: input.team_column.then(|| "team_id".into()),
        watch_columns: Vec::new(),
    };
    let event_id = format!("{}:{}", input.database, input.id);
    let row = OutboxRow {
        event_id: &event_id,
        op: &input.op,
        rows: &input.rows,
        txid: input.txid,
        commit_lsn: input.commit_lsn,
        commit_time_us: 0,
        captured_time_us: 0,
        traceparent: &input.traceparent,
    };
    // `capture.chunk_rows` is validated to be positive.
    let chunk_rows = usize::from(input.chunk_rows % 16) + 1;
    let Ok(events) = events_of(&table, &row, chunk_rows) else { return };

    let mut event_ids = HashSet::new();
    for event in &events {
        assert!(event_ids.insert(event.event_id.as_str()), "event ids are unique: {events:?}");
        assert_eq!(event.table, "res_users");
        assert!(event.tags.iter().any(|t| t == "res_users"), "every event carries the table tag");
        assert!(event.ids.len() <= chunk_rows, "a chunk holds at most chunk_rows ids");
    }
    if input.op == "T" {
        return;
    }
    let width = 3 + table.key_columns.len();
    for image in input.rows.chunks(width) {
        let tenant = image[0].as_deref().unwrap_or("");
        let id = image[1].as_deref().expect("accepted images have ids");
        let mut wanted = vec![format!("res_users.id={id}")];
        for (k, value) in table.key_columns.iter().zip(&image[3..]) {
            if let Some(value) = value {
                wanted.push(format!("res_users.{k}={value}"));
            }
        }
        for tag in wanted {
            assert!(
                events.iter().any(|e| e.tenant == tenant && e.tags.contains(&tag)),
                "image {image:?} lost its tag {tag:?}: {events:?}"
            );
        }
        assert!(events.iter().any(|e| e.tenant == tenant && e.ids.iter().any(|i| i == id)));
        if let Some(team) = image[2].as_deref() {
            assert!(events.iter().any(|e| e.tenant == tenant && e.teams.iter().any(|t| t == team)));
        }
    }
});
