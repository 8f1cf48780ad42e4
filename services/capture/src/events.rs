//! Turning one outbox row (a statement's row images) into invalidation
//! events: grouped by tenant, split into chunks of at most `chunk_rows`
//! distinct ids, with the tags of every image.

use std::collections::{BTreeMap, HashSet};

use herald_core::config::TableConfig;
use herald_core::keys::TenantId;
use herald_proto::v1::{InvalidationEvent, Operation};

/// What the outbox row says, before it becomes events.
pub struct OutboxRow<'a> {
    pub id: i64,
    pub database: &'a str,
    pub op: &'a str,
    /// Flattened images: tenant, id, team, key columns; per row.
    pub rows: &'a [Option<String>],
    pub txid: u64,
    pub commit_lsn: u64,
    pub commit_time_us: i64,
    pub captured_time_us: i64,
    pub traceparent: &'a str,
}

/// One image, borrowed from the row.
struct Image<'a> {
    id: &'a str,
    team: Option<&'a str>,
    keys: &'a [Option<String>],
}

/// The events of `row`, or why it is malformed.
pub fn events_of(
    table: &TableConfig,
    row: &OutboxRow<'_>,
    chunk_rows: usize,
) -> Result<Vec<InvalidationEvent>, String> {
    let operation = match row.op {
        "I" => Operation::Insert,
        "U" => Operation::Update,
        "D" => Operation::Delete,
        "T" => Operation::Truncate,
        other => return Err(format!("unknown op {other:?}")),
    };
    let base = InvalidationEvent {
        event_id: format!("{}:{}", row.database, row.id),
        table: table.name.clone(),
        operation: operation as i32,
        txid: row.txid,
        commit_lsn: row.commit_lsn,
        commit_time_us: row.commit_time_us,
        captured_time_us: row.captured_time_us,
        traceparent: row.traceparent.to_string(),
        ..Default::default()
    };
    if operation == Operation::Truncate {
        if !row.rows.is_empty() {
            return Err("a truncate carries no row images".into());
        }
        // Every row of every tenant is gone.
        return Ok(vec![InvalidationEvent {
            tags: vec![table.name.clone()],
            all_tenants: table.tenant_column.is_some(),
            ..base
        }]);
    }

    let width = crate::schema::image_width(table);
    if row.rows.is_empty() || !row.rows.len().is_multiple_of(width) {
        return Err(format!("{} image values do not make rows of {width}", row.rows.len()));
    }
    let mut by_tenant: BTreeMap<String, Vec<Image<'_>>> = BTreeMap::new();
    for image in row.rows.chunks(width) {
        let tenant = match (&image[0], table.tenant_column.is_some()) {
            (Some(t), true) => TenantId::new(t).map_err(|e| e.to_string())?.to_string(),
            (None, true) => return Err("tenant is NULL for a table with a tenant column".into()),
            (Some(_), false) => return Err("tenant set for a table without a tenant column".into()),
            (None, false) => String::new(),
        };
        let id = image[1].as_deref().ok_or("id is NULL")?;
        by_tenant.entry(tenant).or_default().push(Image { id, team: image[2].as_deref(), keys: &image[3..] });
    }

    let id_prefix = format!("{}.{}=", table.name, table.id_column);
    let key_prefixes: Vec<String> = table.key_columns.iter().map(|k| format!("{}.{k}=", table.name)).collect();
    let mut events = Vec::new();
    for (tenant, images) in by_tenant {
        // Chunks of distinct ids; the old and new image of one row stay together.
        let mut chunk: Vec<&Image<'_>> = Vec::new();
        let mut ids_in_chunk = HashSet::new();
        let mut chunks = Vec::new();
        let mut chunk_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for image in &images {
            if let Some(&c) = chunk_of.get(image.id) {
                if c == chunks.len() {
                    chunk.push(image);
                } else {
                    let earlier: &mut Vec<&Image<'_>> = &mut chunks[c];
                    earlier.push(image);
                }
                continue;
            }
            if ids_in_chunk.len() >= chunk_rows {
                chunks.push(std::mem::take(&mut chunk));
                ids_in_chunk.clear();
            }
            ids_in_chunk.insert(image.id);
            chunk_of.insert(image.id, chunks.len());
            chunk.push(image);
        }
        if !chunk.is_empty() {
            chunks.push(chunk);
        }
        for images in chunks {
            let mut ids = Vec::new();
            let mut tags = vec![table.name.clone()];
            let mut teams = Vec::new();
            let mut seen = HashSet::new();
            let mut tag_seen = HashSet::new();
            for image in images {
                if seen.insert(("id", image.id)) {
                    ids.push(image.id.to_string());
                    tags.push(format!("{id_prefix}{}", image.id));
                }
                for (prefix, value) in key_prefixes.iter().zip(image.keys) {
                    if let Some(value) = value {
                        let tag = format!("{prefix}{value}");
                        if tag_seen.insert(tag.clone()) {
                            tags.push(tag);
                        }
                    }
                }
                if let Some(team) = image.team
                    && seen.insert(("team", team))
                {
                    teams.push(team.to_string());
                }
            }
            events.push(InvalidationEvent { tenant: tenant.clone(), ids, tags, teams, ..base.clone() });
        }
    }
    if events.len() > 1 {
        for (n, event) in events.iter_mut().enumerate() {
            event.event_id = format!("{}.{n}", event.event_id);
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableConfig {
        TableConfig {
            name: "res_users".into(),
            schema: "public".into(),
            table: None,
            id_column: "id".into(),
            key_columns: vec!["slug".into()],
            tenant_column: Some("tenant_id".into()),
            team_column: Some("team_id".into()),
            watch_columns: vec![],
        }
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    fn row<'a>(op: &'a str, rows: &'a [Option<String>]) -> OutboxRow<'a> {
        OutboxRow {
            id: 9,
            database: "db",
            op,
            rows,
            txid: 1,
            commit_lsn: 2,
            commit_time_us: 3,
            captured_time_us: 4,
            traceparent: "",
        }
    }

    #[test]
    fn rename_tags_old_and_new_values_once() {
        let images = [s("acme"), s("1"), s("42"), s("alice"), s("acme"), s("1"), s("43"), s("alice2")];
        let events = events_of(&table(), &row("U", &images), 500).unwrap();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.event_id, "db:9");
        assert_eq!(e.ids, ["1"]);
        assert_eq!(e.tags, ["res_users", "res_users.id=1", "res_users.slug=alice", "res_users.slug=alice2"]);
        assert_eq!(e.teams, ["42", "43"]);
    }

    #[test]
    fn splits_by_tenant_and_chunk_keeping_a_rows_images_together() {
        let mut images = Vec::new();
        for (tenant, id) in [("a", "1"), ("b", "2"), ("a", "3"), ("a", "1"), ("a", "4")] {
            images.extend([s(tenant), s(id), None, None]);
        }
        let events = events_of(&table(), &row("U", &images), 2).unwrap();
        let summary: Vec<(String, Vec<String>)> = events.iter().map(|e| (e.tenant.clone(), e.ids.clone())).collect();
        assert_eq!(
            summary,
            [
                ("a".into(), vec!["1".into(), "3".into()]),
                ("a".into(), vec!["4".into()]),
                ("b".into(), vec!["2".into()])
            ]
        );
        assert_eq!(events[0].event_id, "db:9.0");
        assert_eq!(events[2].event_id, "db:9.2");
    }

    #[test]
    fn malformed_rows_say_why() {
        let t = table();
        assert!(events_of(&t, &row("X", &[s("a"), s("1"), None, None]), 10).unwrap_err().contains("unknown op"));
        assert!(events_of(&t, &row("I", &[s("a"), s("1")]), 10).unwrap_err().contains("rows of 4"));
        assert!(events_of(&t, &row("I", &[s("a b"), s("1"), None, None]), 10).unwrap_err().contains("tenant"));
        assert!(events_of(&t, &row("I", &[None, s("1"), None, None]), 10).unwrap_err().contains("NULL"));
        assert!(events_of(&t, &row("I", &[]), 10).is_err());
    }

    #[test]
    fn truncate_of_a_tenant_table_concerns_every_tenant() {
        let events = events_of(&table(), &row("T", &[]), 10).unwrap();
        assert!(events[0].all_tenants);
        assert_eq!(events[0].tags, ["res_users"]);
    }
}
