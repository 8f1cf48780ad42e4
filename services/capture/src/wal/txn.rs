//! Turning one committed transaction of the replication stream into
//! invalidation events — the same events the outbox source makes.
//!
//! New row images come from pgoutput Insert and Update messages. Old images
//! come from the stream too when the table has `REPLICA IDENTITY FULL`
//! (`capture.old_images = "replica_identity"`): Update and Delete then carry
//! the whole old row, and capture compares the rows itself. Otherwise
//! (`"triggers"`) they come from Herald's row triggers, as transactional
//! logical messages (prefix [`MESSAGE_PREFIX`], a JSON array):
//! * `["U", table, tenant, id, team, key…]`: the old image of an update that
//!   changed the id, a key, the tenant or the team;
//! * `["D", table, tenant, id, team, key…]`: a deleted row;
//! * `["S", table, id]`: an update that changed no watched column: its new
//!   image (already received, same statement) is dropped again.
//!
//! Images are grouped per table and operation, in order of appearance, and
//! turned into events by [`crate::events::events_of`] (tenant, chunks, tags).
//! A transaction larger than `flush_images` is turned into events in parts
//! while it streams, so capture's memory stays bounded; a skip that arrives
//! after its image was flushed leaves one event more (safe).

use std::collections::HashMap;

use bytes::Bytes;
use herald_core::config::TableConfig;
use herald_proto::v1::InvalidationEvent;

use super::pgoutput::{self, Change, Relation, Value};
use crate::events::{OutboxRow, events_of};

/// The prefix of Herald's logical messages.
pub const MESSAGE_PREFIX: &str = "herald";

/// What capture needs from one relation: where its columns are.
#[derive(Debug, Clone)]
struct Route {
    table: usize,
    id: usize,
    tenant: Option<usize>,
    team: Option<usize>,
    keys: Vec<usize>,
    /// Columns whose change matters; `None`: every column.
    watched: Option<Vec<usize>>,
}

/// Images of one table and operation within a transaction.
struct Group {
    table: usize,
    op: char,
    images: Vec<Option<Vec<Option<String>>>>,
}

struct Transaction {
    final_lsn: u64,
    xid: u32,
    commit_time_us: i64,
    groups: Vec<Group>,
    group_of: HashMap<(usize, char), usize>,
    /// Buffered update images by (table, id): (group, image index).
    updates: HashMap<(usize, String), Vec<(usize, usize)>>,
    buffered: usize,
    /// Groups turned into events so far (numbers the event ids).
    sequence: u64,
}

/// Why a message could not be applied. Capture stops at it and does not
/// confirm the transaction, so nothing is lost while it is fixed.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    #[error("table {table}: column {column:?} ({key}) is not in the replication stream's description of {relation}")]
    MissingColumn { table: String, key: &'static str, column: String, relation: String },
    #[error("change of relation {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("malformed herald message {content:?}: {reason}")]
    BadMessage { content: String, reason: String },
    #[error("{0} outside a transaction")]
    OutsideTransaction(&'static str),
}

/// Assembles transactions into events.
pub struct Assembler {
    tables: Vec<TableConfig>,
    by_name: HashMap<String, usize>,
    by_relation_name: HashMap<(String, String), usize>,
    routes: HashMap<u32, Option<Route>>,
    database: String,
    chunk_rows: usize,
    flush_images: usize,
    tx: Option<Transaction>,
}

/// Events of (part of) a transaction, with the images set aside.
#[derive(Debug, Default)]
pub struct Assembled {
    pub events: Vec<InvalidationEvent>,
    /// Reasons images were set aside (logged and counted by the caller).
    pub set_aside: Vec<String>,
}

impl Assembler {
    pub fn new(tables: &[TableConfig], database: &str, chunk_rows: usize, flush_images: usize) -> Self {
        Self {
            tables: tables.to_vec(),
            by_name: tables.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
            by_relation_name: tables
                .iter()
                .enumerate()
                .map(|(i, t)| ((t.schema.clone(), t.pg_table().to_string()), i))
                .collect(),
            routes: HashMap::new(),
            database: database.to_string(),
            chunk_rows: chunk_rows.max(1),
            flush_images: flush_images.max(1),
            tx: None,
        }
    }

    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// True when the open transaction holds enough images to flush a part.
    pub fn over_bound(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.buffered >= self.flush_images)
    }

    pub fn begin(&mut self, final_lsn: u64, xid: u32, commit_time_us: i64) {
        self.tx = Some(Transaction {
            final_lsn,
            xid,
            commit_time_us,
            groups: Vec::new(),
            group_of: HashMap::new(),
            updates: HashMap::new(),
            buffered: 0,
            sequence: 0,
        });
    }

    /// Applies one raw pgoutput message.
    pub fn change(&mut self, data: &Bytes) -> Result<(), TxnError> {
        match pgoutput::decode(data)? {
            Change::Relation(relation) => self.relation(relation)?,
            Change::Insert { relation, new } => {
                if let Some(route) = self.route(relation)? {
                    let image = image_of(&route, &new);
                    self.push(route.table, 'I', image, None)?;
                }
            }
            Change::Update { relation, old: Some(old), new } => {
                if let Some(route) = self.route(relation)? {
                    self.update_of_rows(&route, &old, &new)?;
                }
            }
            // The trigger messages bring the old image, or drop the update.
            Change::Update { relation, old: None, new } => {
                if let Some(route) = self.route(relation)? {
                    let image = image_of(&route, &new);
                    let id = image[1].clone();
                    self.push(route.table, 'U', image, id)?;
                }
            }
            Change::Delete { relation, old: Some(old) } => {
                if let Some(route) = self.route(relation)? {
                    self.push(route.table, 'D', image_of(&route, &old), None)?;
                }
            }
            // The replica identity key only: the delete trigger's message
            // brings the whole old image.
            Change::Delete { old: None, .. } | Change::Ignored(_) => {}
            Change::Truncate { relations } => {
                for relation in relations {
                    if let Some(route) = self.route(relation)? {
                        self.group(route.table, 'T')?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies one logical message; messages of other prefixes are ignored.
    pub fn message(&mut self, prefix: &str, content: &[u8]) -> Result<(), TxnError> {
        if prefix != MESSAGE_PREFIX {
            return Ok(());
        }
        let bad = |reason: &str| TxnError::BadMessage {
            content: String::from_utf8_lossy(content).chars().take(200).collect(),
            reason: reason.to_string(),
        };
        let values: Vec<Option<String>> = serde_json::from_slice(content).map_err(|e| bad(&e.to_string()))?;
        let (Some(Some(kind)), Some(Some(table))) = (values.first(), values.get(1)) else {
            return Err(bad("no kind and table"));
        };
        // A table no longer configured: its trigger outlived the config.
        let Some(&index) = self.by_name.get(table) else { return Ok(()) };
        let width = crate::schema::image_width(&self.tables[index]);
        match kind.as_str() {
            "U" | "D" if values.len() == 2 + width => {
                let op = if kind == "U" { 'U' } else { 'D' };
                self.push(index, op, values[2..].to_vec(), None)
            }
            "S" if values.len() == 3 => {
                self.skip(index, values[2].clone().unwrap_or_default());
                Ok(())
            }
            _ => Err(bad(&format!("kind {kind:?} with {} values", values.len()))),
        }
    }

    /// Turns what the open transaction buffered into events (a part of a
    /// large transaction); the transaction stays open.
    pub fn flush(&mut self, captured_time_us: i64) -> Assembled {
        let Some(tx) = self.tx.as_mut() else { return Assembled::default() };
        let groups = std::mem::take(&mut tx.groups);
        tx.group_of.clear();
        tx.updates.clear();
        tx.buffered = 0;
        let mut out = Assembled::default();
        for group in groups {
            let tx = self.tx.as_mut().expect("open transaction");
            let event_id = format!("{}:{}.{}", self.database, lsn_text(tx.final_lsn), tx.sequence);
            tx.sequence += 1;
            let op = group.op.to_string();
            let rows: Vec<Option<String>> = group.images.into_iter().flatten().flatten().collect();
            if rows.is_empty() && group.op != 'T' {
                continue;
            }
            let row = OutboxRow {
                event_id: &event_id,
                op: &op,
                rows: &rows,
                txid: u64::from(tx.xid),
                commit_lsn: tx.final_lsn,
                commit_time_us: tx.commit_time_us,
                captured_time_us,
                traceparent: "",
            };
            match events_of(&self.tables[group.table], &row, self.chunk_rows) {
                Ok(parsed) => {
                    out.events.extend(parsed.events);
                    if !parsed.reason.is_empty() {
                        out.set_aside.push(format!("{event_id}: {}", parsed.reason));
                    }
                }
                Err(reason) => out.set_aside.push(format!("{event_id}: {reason}")),
            }
        }
        out
    }

    /// Ends the transaction: the rest of its events.
    pub fn commit(&mut self, captured_time_us: i64) -> Assembled {
        let out = self.flush(captured_time_us);
        self.tx = None;
        out
    }

    /// An UPDATE whose old row the stream carries: dropped when no watched
    /// column changed; with the old image too when the id, a key, the tenant
    /// or the team changed (a rename's old key, a team move's old team).
    fn update_of_rows(&mut self, route: &Route, old: &[Value], new: &[Value]) -> Result<(), TxnError> {
        // pgoutput does not resend an unchanged TOASTed value: the old row's
        // (rare: the row is copied only then).
        let merged: Vec<Value>;
        let new = if new.contains(&Value::Unchanged) {
            merged = new
                .iter()
                .enumerate()
                .map(|(i, value)| match (value, old.get(i)) {
                    (Value::Unchanged, Some(previous)) => previous.clone(),
                    _ => value.clone(),
                })
                .collect();
            &merged[..]
        } else {
            new
        };
        let changed = match &route.watched {
            Some(columns) => columns.iter().any(|&i| old.get(i) != new.get(i)),
            None => old != new,
        };
        if !changed {
            return Ok(());
        }
        let (old_image, new_image) = (image_of(route, old), image_of(route, new));
        let moved = old_image != new_image;
        self.push(route.table, 'U', new_image, None)?;
        if moved {
            self.push(route.table, 'U', old_image, None)?;
        }
        Ok(())
    }

    fn relation(&mut self, relation: Relation) -> Result<(), TxnError> {
        let Some(&table) = self.by_relation_name.get(&(relation.schema.clone(), relation.name.clone())) else {
            self.routes.insert(relation.id, None);
            return Ok(());
        };
        let config = &self.tables[table];
        let position = |key: &'static str, column: &str| {
            relation.columns.iter().position(|c| c.name == column).ok_or_else(|| TxnError::MissingColumn {
                table: config.name.clone(),
                key,
                column: column.to_string(),
                relation: format!("{}.{}", relation.schema, relation.name),
            })
        };
        let route = Route {
            table,
            id: position("id_column", &config.id_column)?,
            tenant: config.tenant_column.as_deref().map(|c| position("tenant_column", c)).transpose()?,
            team: config.team_column.as_deref().map(|c| position("team_column", c)).transpose()?,
            keys: config.key_columns.iter().map(|c| position("key_columns", c)).collect::<Result<_, _>>()?,
            watched: match crate::schema::watched_columns(config) {
                columns if columns.is_empty() => None,
                columns => Some(columns.iter().map(|c| position("watch_columns", c)).collect::<Result<_, _>>()?),
            },
        };
        self.routes.insert(relation.id, Some(route));
        Ok(())
    }

    fn route(&self, relation: u32) -> Result<Option<Route>, TxnError> {
        self.routes.get(&relation).cloned().ok_or(TxnError::UnknownRelation(relation))
    }

    fn group(&mut self, table: usize, op: char) -> Result<usize, TxnError> {
        let tx = self.tx.as_mut().ok_or(TxnError::OutsideTransaction("a change"))?;
        Ok(*tx.group_of.entry((table, op)).or_insert_with(|| {
            tx.groups.push(Group { table, op, images: Vec::new() });
            tx.groups.len() - 1
        }))
    }

    fn push(
        &mut self,
        table: usize,
        op: char,
        image: Vec<Option<String>>,
        update_id: Option<String>,
    ) -> Result<(), TxnError> {
        let group = self.group(table, op)?;
        let tx = self.tx.as_mut().expect("group checked the transaction");
        let images = &mut tx.groups[group].images;
        images.push(Some(image));
        if let Some(id) = update_id {
            tx.updates.entry((table, id)).or_default().push((group, images.len() - 1));
        }
        tx.buffered += 1;
        Ok(())
    }

    fn skip(&mut self, table: usize, id: String) {
        let Some(tx) = self.tx.as_mut() else { return };
        if let Some((group, index)) = tx.updates.get_mut(&(table, id)).and_then(Vec::pop) {
            tx.groups[group].images[index] = None;
        }
    }
}

/// The image (tenant, id, team, keys…) of a new tuple. A value pgoutput did
/// not resend (an unchanged TOASTed key) is unknown: the id is then dropped,
/// which sets the image aside with a table-wide event for its tenant.
fn image_of(route: &Route, tuple: &[Value]) -> Vec<Option<String>> {
    let mut unknown = false;
    let mut value = |index: Option<usize>| match index.and_then(|i| tuple.get(i)) {
        Some(Value::Text(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Some(Value::Unchanged) => {
            unknown = true;
            None
        }
        _ => None,
    };
    let mut image = vec![value(route.tenant), value(Some(route.id)), value(route.team)];
    image.extend(route.keys.iter().map(|&k| value(Some(k))));
    if unknown {
        image[1] = None;
    }
    image
}

/// An LSN as Postgres writes it (`16/B374D848`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::pgoutput::tests::tuple;
    use herald_proto::v1::Operation;

    fn users() -> TableConfig {
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

    fn relation(columns: &[&str]) -> Bytes {
        let mut m = vec![b'R'];
        m.extend(7u32.to_be_bytes());
        m.extend(b"public\0res_users\0d");
        m.extend((columns.len() as u16).to_be_bytes());
        for c in columns {
            m.push(0);
            m.extend(c.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        Bytes::from(m)
    }

    fn row(tag: u8, values: &[&str]) -> Bytes {
        let mut m = vec![tag];
        m.extend(7u32.to_be_bytes());
        m.push(b'N');
        m.extend(tuple(&values.iter().map(|v| Some(*v)).collect::<Vec<_>>()));
        Bytes::from(m)
    }

    const COLUMNS: [&str; 5] = ["id", "tenant_id", "team_id", "slug", "name"];

    /// An Update (`new` given) or Delete with REPLICA IDENTITY FULL's old row.
    fn full(old: &[Option<&str>], new: Option<&[Option<&str>]>) -> Bytes {
        let mut m = vec![if new.is_some() { b'U' } else { b'D' }];
        m.extend(7u32.to_be_bytes());
        m.push(b'O');
        m.extend(tuple(old));
        if let Some(new) = new {
            m.push(b'N');
            m.extend(tuple(new));
        }
        Bytes::from(m)
    }

    #[test]
    fn with_replica_identity_full_the_stream_brings_old_images_and_unwatched_updates_drop() {
        let mut watched = users();
        watched.watch_columns = vec!["name".into()];
        let mut a = Assembler::new(&[watched], "db", 500, 10_000);
        a.begin(16, 1, 1);
        a.change(&relation(&[&COLUMNS[..], &["note"]].concat())).unwrap();
        let row = |slug, team, name, note| [Some("1"), Some("acme"), team, Some(slug), Some(name), Some(note)];
        // A rename and a team move: old and new tags and teams.
        a.change(&full(&row("alice", Some("41"), "A", "x"), Some(&row("alice2", Some("42"), "A", "x")))).unwrap();
        // An unwatched column only: dropped.
        a.change(&full(&row("carol", None, "C", "x"), Some(&row("carol", None, "C", "y")))).unwrap();
        // A watched column, the key unchanged and TOASTed: one image, old key.
        a.change(&full(&row("dave", None, "D", "x"), Some(&row("\u{0}", None, "D2", "x")))).unwrap();
        a.change(&full(&row("erin", None, "E", "x"), None)).unwrap();
        let events = a.commit(0).events;
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].operation(), Operation::Update);
        assert_eq!(
            events[0].tags,
            ["res_users", "res_users.id=1", "res_users.slug=alice2", "res_users.slug=alice", "res_users.slug=dave"]
        );
        assert_eq!(events[0].teams, ["42", "41"]);
        assert_eq!(events[1].operation(), Operation::Delete);
        assert!(events[1].tags.contains(&"res_users.slug=erin".to_string()), "{:?}", events[1].tags);
    }

    #[test]
    fn a_rename_carries_old_and_new_values_and_a_skip_drops_an_unwatched_update() {
        let mut a = Assembler::new(&[users()], "db", 500, 10_000);
        a.begin(0x1_0000_0010, 5, 1);
        a.change(&relation(&COLUMNS)).unwrap();
        a.change(&row(b'U', &["1", "acme", "42", "alice2", "A"])).unwrap();
        a.message("herald", br#"["U","res_users","acme","1","41","alice"]"#).unwrap();
        a.change(&row(b'U', &["2", "acme", "42", "bob", "B"])).unwrap();
        a.message("herald", br#"["S","res_users","2"]"#).unwrap();
        let events = a.commit(9).events;
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.event_id, "db:1/10.0");
        assert_eq!((e.commit_lsn, e.txid, e.operation()), (0x1_0000_0010, 5, Operation::Update));
        assert_eq!(e.ids, ["1"]);
        assert_eq!(e.tags, ["res_users", "res_users.id=1", "res_users.slug=alice2", "res_users.slug=alice"]);
        assert_eq!(e.teams, ["42", "41"]);
    }

    #[test]
    fn deletes_truncates_and_parts_of_large_transactions() {
        let mut a = Assembler::new(&[users()], "db", 2, 3);
        a.begin(16, 1, 1);
        a.change(&relation(&COLUMNS)).unwrap();
        for id in 1..=3 {
            a.change(&row(b'I', &[&id.to_string(), "acme", "1", "s", "n"])).unwrap();
        }
        assert!(a.over_bound());
        let part = a.flush(0).events;
        assert_eq!(part.iter().map(|e| e.ids.len()).sum::<usize>(), 3);
        assert!(!a.over_bound());
        a.message("herald", br#"["D","res_users","acme","3","1","s"]"#).unwrap();
        let mut t = vec![b'T'];
        t.extend(1u32.to_be_bytes());
        t.push(0);
        t.extend(7u32.to_be_bytes());
        a.change(&Bytes::from(t)).unwrap();
        let rest = a.commit(0).events;
        let ids: Vec<&str> = part.iter().chain(&rest).map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["db:0/10.0.0", "db:0/10.0.1", "db:0/10.1", "db:0/10.2"]);
        assert_eq!(rest[0].operation(), Operation::Delete);
        assert!(rest[1].all_tenants && rest[1].operation() == Operation::Truncate);
    }

    #[test]
    fn a_column_herald_needs_that_disappears_is_named() {
        let mut a = Assembler::new(&[users()], "db", 500, 10_000);
        let err = a.change(&relation(&["id", "tenant_id", "team_id"])).unwrap_err().to_string();
        assert!(err.contains("res_users") && err.contains("\"slug\"") && err.contains("key_columns"), "{err}");
        assert!(a.message("herald", b"[1]").is_err());
        assert!(matches!(a.change(&row(b'I', &["1"])), Err(TxnError::UnknownRelation(7))));
    }
}
