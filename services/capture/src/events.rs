//! Turning one outbox row (a statement's row images) into invalidation
//! events: grouped by tenant, split into chunks of at most `chunk_rows`
//! distinct ids, with the tags of every image.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use herald_core::config::TableConfig;
use herald_core::keys::TenantId;
use herald_proto::v1::{InvalidationEvent, Operation};

/// What the outbox row says, before it becomes events.
pub struct OutboxRow<'a> {
    /// The events' id, `<database>:<outbox row id>` or, from the WAL,
    /// `<database>:<commit LSN>.<group>`; `.n` is appended when the row
    /// makes several events.
    pub event_id: &'a str,
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

/// What capture makes of one outbox row.
#[derive(Debug, Default)]
pub struct Parsed {
    pub events: Vec<InvalidationEvent>,
    /// Images that cannot become events, flattened like [`OutboxRow::rows`];
    /// kept in `herald.dead_letter` with [`Parsed::reason`], never dropped.
    pub set_aside: Vec<Option<String>>,
    /// Why the images in `set_aside` were set aside (empty when none were).
    pub reason: String,
}

/// Where an image goes: to its tenant's events, or aside.
enum Sorted {
    Tenant(String),
    /// Set aside; `fail_safe` names the scope (tenant, or "" for global)
    /// that gets a table-wide event in its place.
    Aside {
        reason: String,
        fail_safe: Option<String>,
    },
}

/// Sorts one image by tenant.
///
/// An image set aside loses its own event, so each case says what may depend
/// on it:
/// * a tenant that is not a valid tenant id, or NULL on a tenant table: no
///   cache scope can be named by it (every scope is a validated tenant id),
///   so no entry can depend on the image; no fail-safe event. A table-wide
///   event for every tenant instead would flush every node's L1 whenever a
///   statement touched such a row — one legacy row would make every write
///   of the table a global flush.
/// * a tenant on a table configured without one: the trigger and capture's
///   config disagree, and the config says this table's entries live in the
///   global scope, so that scope gets a table-wide event.
/// * a NULL id: the tenant is known, so that tenant gets a table-wide event.
fn sort(table: &TableConfig, image: &[Option<String>]) -> Sorted {
    let tenant = match (&image[0], table.tenant_column.is_some()) {
        (Some(t), true) => match TenantId::new(t) {
            Ok(t) => t.to_string(),
            Err(e) => return Sorted::Aside { reason: format!("tenant {t:?}: {e}"), fail_safe: None },
        },
        (None, true) => {
            return Sorted::Aside { reason: "tenant is NULL for a table with a tenant column".into(), fail_safe: None };
        }
        (Some(_), false) => {
            return Sorted::Aside {
                reason: "tenant set for a table without a tenant column".into(),
                fail_safe: Some(String::new()),
            };
        }
        (None, false) => String::new(),
    };
    if image[1].is_none() {
        return Sorted::Aside { reason: "id is NULL".into(), fail_safe: Some(tenant) };
    }
    Sorted::Tenant(tenant)
}

/// The events of `row` and the images set aside, or why the whole row is
/// malformed.
pub fn events_of(table: &TableConfig, row: &OutboxRow<'_>, chunk_rows: usize) -> Result<Parsed, String> {
    let operation = match row.op {
        "I" => Operation::Insert,
        "U" => Operation::Update,
        "D" => Operation::Delete,
        "T" => Operation::Truncate,
        other => return Err(format!("unknown op {other:?}")),
    };
    let base = InvalidationEvent {
        event_id: row.event_id.to_string(),
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
        let event =
            InvalidationEvent { tags: vec![table.name.clone()], all_tenants: table.tenant_column.is_some(), ..base };
        return Ok(Parsed { events: vec![event], ..Default::default() });
    }

    let width = crate::schema::image_width(table);
    if row.rows.is_empty() || !row.rows.len().is_multiple_of(width) {
        return Err(format!("{} image values do not make rows of {width}", row.rows.len()));
    }
    let mut parsed = Parsed::default();
    let mut reasons = BTreeSet::new();
    let mut fail_safe = BTreeSet::new();
    let mut by_tenant: BTreeMap<String, Vec<Image<'_>>> = BTreeMap::new();
    for image in row.rows.chunks(width) {
        match sort(table, image) {
            Sorted::Tenant(tenant) => by_tenant.entry(tenant).or_default().push(Image {
                id: image[1].as_deref().unwrap_or_default(),
                team: image[2].as_deref(),
                keys: &image[3..],
            }),
            Sorted::Aside { reason, fail_safe: scope } => {
                parsed.set_aside.extend_from_slice(image);
                reasons.insert(reason);
                fail_safe.extend(scope);
            }
        }
    }
    if !reasons.is_empty() {
        let count = parsed.set_aside.len() / width;
        parsed.reason = format!("{count} image(s) set aside: {}", reasons.into_iter().collect::<Vec<_>>().join("; "));
    }

    let events = &mut parsed.events;
    for tenant in fail_safe {
        events.push(InvalidationEvent { tenant, tags: vec![table.name.clone()], widened: true, ..base.clone() });
    }
    for (tenant, images) in by_tenant {
        for chunk in chunks(&images, chunk_rows) {
            events.push(InvalidationEvent { tenant: tenant.clone(), ..tagged(table, &chunk, &base) });
        }
    }
    if events.len() > 1 {
        for (n, event) in events.iter_mut().enumerate() {
            event.event_id = format!("{}.{n}", event.event_id);
        }
    }
    Ok(parsed)
}

/// Chunks of at most `chunk_rows` distinct ids; the old and new image of one
/// row stay together.
fn chunks<'i, 'a>(images: &'i [Image<'a>], chunk_rows: usize) -> Vec<Vec<&'i Image<'a>>> {
    let mut chunk: Vec<&Image<'_>> = Vec::new();
    let mut ids_in_chunk = HashSet::new();
    let mut chunks = Vec::new();
    let mut chunk_of: HashMap<&str, usize> = HashMap::new();
    for image in images {
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
    chunks
}

/// `base` with the ids, tags and teams of `images`.
fn tagged(table: &TableConfig, images: &[&Image<'_>], base: &InvalidationEvent) -> InvalidationEvent {
    let id_prefix = format!("{}.{}=", table.name, table.id_column);
    let key_prefixes: Vec<String> = table.key_columns.iter().map(|k| format!("{}.{k}=", table.name)).collect();
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
    InvalidationEvent { ids, tags, teams, ..base.clone() }
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
            event_id: "db:9",
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
        let events = events_of(&table(), &row("U", &images), 500).unwrap().events;
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
        let events = events_of(&table(), &row("U", &images), 2).unwrap().events;
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
        assert!(events_of(&t, &row("I", &[]), 10).is_err());
    }

    #[test]
    fn bad_images_go_aside_alone() {
        let t = table();
        let images = [s("acme"), s("1"), None, s("alice"), s("a b"), s("2"), None, None, None, s("3"), None, None];
        let parsed = events_of(&t, &row("U", &images), 10).unwrap();
        assert_eq!(parsed.events.len(), 1);
        assert_eq!((parsed.events[0].tenant.as_str(), &parsed.events[0].ids[..]), ("acme", &["1".to_string()][..]));
        assert_eq!(parsed.set_aside, [s("a b"), s("2"), None, None, None, s("3"), None, None]);
        assert!(parsed.reason.starts_with("2 image(s) set aside"), "{}", parsed.reason);
        assert!(parsed.reason.contains("tenant \"a b\"") && parsed.reason.contains("NULL"), "{}", parsed.reason);
    }

    #[test]
    fn images_whose_scope_is_known_fail_safe_to_a_table_wide_event() {
        // A NULL id in a known tenant: that tenant's table-wide event.
        let parsed = events_of(&table(), &row("D", &[s("acme"), None, None, s("x")]), 10).unwrap();
        assert_eq!(parsed.set_aside.len(), 4);
        let e = &parsed.events[0];
        assert_eq!((e.tenant.as_str(), &e.tags[..], e.widened), ("acme", &["res_users".to_string()][..], true));
        // A tenant on a table configured without one: the global scope.
        let global = TableConfig { tenant_column: None, ..table() };
        let parsed = events_of(&global, &row("I", &[s("acme"), s("1"), None, None]), 10).unwrap();
        let e = &parsed.events[0];
        assert_eq!((e.tenant.as_str(), e.widened, e.all_tenants), ("", true, false));
    }

    #[test]
    fn truncate_of_a_tenant_table_concerns_every_tenant() {
        let events = events_of(&table(), &row("T", &[]), 10).unwrap().events;
        assert!(events[0].all_tenants);
        assert_eq!(events[0].tags, ["res_users"]);
    }
}
