//! What the WAL source installs: a publication of the watched tables, and
//! per table what brings the old row images (`capture.old_images`):
//!
//! * `replica_identity` (default): `REPLICA IDENTITY FULL`, so the stream
//!   carries the old row of every UPDATE and DELETE, and no trigger runs on
//!   any write. The table's previous identity is kept in `herald.meta` and
//!   put back when Herald leaves the table (triggers, outbox, uninstall).
//!   Measured: writer backends spend 10 µs less CPU per UPDATE, and 20 µs
//!   less per DELETE, than with the triggers, whose `WHEN` runs on every
//!   UPDATE (README, "What each source costs writers").
//! * `triggers`: the publication has no deletes, and two row triggers emit
//!   transactional logical messages only where the stream lacks something
//!   (see `txn.rs` for the messages):
//!
//! * `herald_capture_wal_upd`, `AFTER UPDATE … FOR EACH ROW WHEN (…)`: fires
//!   only when the id, a key, the tenant or the team changed (old image
//!   wanted), or when no watched column changed (the update is dropped).
//!   An update of a watched column — the common case — fires nothing.
//! * `herald_capture_wal_del`, `AFTER DELETE … FOR EACH ROW`: the old image.

use std::collections::HashMap;

use herald_core::config::{CaptureConfig, OldImages, TableConfig};

use super::txn::MESSAGE_PREFIX;
use crate::schema::{function_name, lit, q, qualified, watched_columns};

/// Names of the WAL source's triggers.
pub const TRIGGERS: [&str; 2] = ["herald_capture_wal_upd", "herald_capture_wal_del"];

/// Base type names (`regtype` text, domains resolved) of a table's columns.
pub type ColumnTypes = HashMap<String, String>;

/// How the update trigger's `WHEN` compares a column between `OLD` and
/// `NEW`. It runs on every UPDATE of a watched table, so it matters: as
/// text, an integer pays an output function on both sides (measured ~13 µs
/// of CPU per single-row UPDATE, about 12 %, against the typed form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compare {
    /// The type's own `=`, where equal values always have the same text
    /// (the cache key): integers, boolean, uuid.
    Typed,
    /// Strings, bytewise (`COLLATE "C"`): a case-insensitive collation's
    /// `=` would call a slug's case change no change.
    Bytes,
    /// Everything else as text: numeric `1.0 = 1.00` and json (no `=`) must
    /// neither hide a change of the cache key nor break the writer.
    Text,
}

impl Compare {
    fn of(column: &str, types: &ColumnTypes) -> Compare {
        match types.get(column).map(String::as_str) {
            Some("smallint" | "integer" | "bigint" | "boolean" | "uuid" | "oid") => Compare::Typed,
            Some("text" | "character varying") => Compare::Bytes,
            _ => Compare::Text,
        }
    }

    /// `column` of `alias` (`OLD`/`NEW`), as compared.
    fn operand(self, alias: &str, column: &str) -> String {
        match self {
            Compare::Typed => format!("{alias}.{}", q(column)),
            Compare::Bytes => format!("{alias}.{} COLLATE \"C\"", q(column)),
            Compare::Text => text(alias, Some(column)),
        }
    }
}

/// `OLD.c IS DISTINCT FROM NEW.c OR …` over `columns` (`negated`: `AND` of
/// `IS NOT DISTINCT FROM`), each compared as [`Compare::of`] says.
fn compare_all(columns: &[&str], types: &ColumnTypes, negated: bool) -> String {
    let (op, join) = if negated { ("IS NOT DISTINCT FROM", " AND ") } else { ("IS DISTINCT FROM", " OR ") };
    let terms: Vec<String> = columns
        .iter()
        .map(|c| {
            let compare = Compare::of(c, types);
            format!("{} {op} {}", compare.operand("OLD", c), compare.operand("NEW", c))
        })
        .collect();
    format!("({})", terms.join(join))
}

/// `col::text` of `alias` (`OLD`/`NEW`), or NULL for an unconfigured column.
fn text(alias: &str, column: Option<&str>) -> String {
    match column {
        Some(c) => format!("{alias}.{}::text", q(c)),
        None => "NULL::text".into(),
    }
}

/// The image values (tenant, id, team, keys…) of `alias`, as SQL.
fn image(alias: &str, table: &TableConfig) -> Vec<String> {
    let mut values = vec![
        text(alias, table.tenant_column.as_deref()),
        text(alias, Some(&table.id_column)),
        text(alias, table.team_column.as_deref()),
    ];
    values.extend(table.key_columns.iter().map(|k| text(alias, Some(k))));
    values
}

/// The columns that name a row's cache scope and tags.
fn identity_columns(table: &TableConfig) -> Vec<&str> {
    let mut columns: Vec<&str> = vec![&table.id_column];
    columns.extend(table.tenant_column.as_deref());
    columns.extend(table.team_column.as_deref());
    columns.extend(table.key_columns.iter().map(String::as_str));
    columns
}

/// True when no column that matters changed. A table without watch columns
/// compares whole rows as text (any column matters, whatever its type).
fn nothing_watched_changed(table: &TableConfig, types: &ColumnTypes) -> String {
    let watched = watched_columns(table);
    if watched.is_empty() {
        return "(OLD.*)::text IS NOT DISTINCT FROM (NEW.*)::text".into();
    }
    let columns: Vec<&str> = watched.iter().map(String::as_str).collect();
    compare_all(&columns, types, true)
}

/// What the publication publishes: deletes only when the stream brings
/// their old rows (with triggers, the delete trigger's message does).
fn publish(capture: &CaptureConfig) -> &'static str {
    match capture.old_images {
        OldImages::ReplicaIdentity => "insert, update, delete, truncate",
        OldImages::Triggers => "insert, update, truncate",
    }
}

/// Creates the publication, empty, unless it exists. It must exist before
/// the slot is created: pgoutput looks publications up as of each change it
/// decodes, and a change older than the publication would fail the stream.
pub fn publication_create_sql(capture: &CaptureConfig) -> String {
    format!(
        "DO $herald$ BEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {}) THEN\n        \
         CREATE PUBLICATION {} WITH (publish = '{}');\n    END IF;\nEND $herald$;\n",
        lit(&capture.publication),
        q(&capture.publication),
        publish(capture)
    )
}

/// The publication's operations and table list, set on every install.
pub fn publication_sql(tables: &[TableConfig], capture: &CaptureConfig) -> String {
    let name = q(&capture.publication);
    let mut sql = publication_create_sql(capture);
    sql.push_str(&format!("ALTER PUBLICATION {name} SET (publish = '{}');\n", publish(capture)));
    if !tables.is_empty() {
        let list: Vec<String> = tables.iter().map(|t| qualified(&t.schema, t.pg_table())).collect();
        sql.push_str(&format!("ALTER PUBLICATION {name} SET TABLE {};\n", list.join(", ")));
    }
    sql
}

/// Prefix of the `herald.meta` keys that keep tables' replica identities.
const IDENTITY_META: &str = "replica_identity:";

/// The `herald.meta` key that keeps a table's replica identity from before
/// Herald set it to FULL (`default`, `nothing` or `index:<name>`).
pub fn identity_meta_key(table: &TableConfig) -> String {
    format!("{IDENTITY_META}{}", qualified(&table.schema, table.pg_table()))
}

/// `REPLICA IDENTITY FULL` on `table`, its previous identity kept (once:
/// a second install finds FULL and keeps the first record).
pub fn replica_identity_full_sql(table: &TableConfig) -> String {
    let target = qualified(&table.schema, table.pg_table());
    format!(
        r#"DO $herald$ BEGIN
    IF (SELECT relreplident FROM pg_class WHERE oid = {regclass}::regclass) <> 'f' THEN
        INSERT INTO herald.meta (key, value)
        SELECT {key}, CASE c.relreplident WHEN 'd' THEN 'default' WHEN 'n' THEN 'nothing' ELSE 'index:' || (
            SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
            WHERE i.indrelid = c.oid AND i.indisreplident) END
        FROM pg_class c WHERE c.oid = {regclass}::regclass
        ON CONFLICT (key) DO NOTHING;
        ALTER TABLE {target} REPLICA IDENTITY FULL;
    END IF;
END $herald$;
"#,
        regclass = lit(&target),
        key = lit(&identity_meta_key(table)),
    )
}

/// Puts back the recorded replica identity of every table Herald set to
/// FULL that is not among `kept` (the tables FULL-captured now; none when
/// old images come from triggers, with the outbox source, on uninstall).
/// Names come from the catalog (`regclass`), never from the recorded text;
/// a table that no longer exists is forgotten. A table that was FULL before
/// Herald has no record and stays FULL.
pub fn replica_identity_restore_sql(kept: &[TableConfig]) -> String {
    let kept: Vec<String> = kept.iter().map(|t| lit(&identity_meta_key(t))).chain(["''".to_string()]).collect();
    format!(
        r#"DO $herald$ DECLARE r record; BEGIN
    IF to_regclass('herald.meta') IS NULL THEN RETURN; END IF;
    FOR r IN DELETE FROM herald.meta WHERE key LIKE {pattern} AND key NOT IN ({kept})
        RETURNING value, to_regclass(substr(key, length({prefix}) + 1)) AS rel
    LOOP
        CONTINUE WHEN r.rel IS NULL;
        IF r.value = 'default' THEN EXECUTE format('ALTER TABLE %s REPLICA IDENTITY DEFAULT', r.rel);
        ELSIF r.value = 'nothing' THEN EXECUTE format('ALTER TABLE %s REPLICA IDENTITY NOTHING', r.rel);
        ELSIF r.value LIKE 'index:%' THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY USING INDEX %I', r.rel, substr(r.value, 7));
        END IF;
    END LOOP;
END $herald$;
"#,
        pattern = lit(&format!("{}%", IDENTITY_META.replace('_', "\\_"))),
        prefix = lit(IDENTITY_META),
        kept = kept.join(", ")
    )
}

/// The two row triggers of one table, whose columns have `types` (a column
/// missing there is compared as text).
pub fn table_sql(table: &TableConfig, types: &ColumnTypes) -> String {
    let target = qualified(&table.schema, table.pg_table());
    let name = lit(&table.name);
    let old = image("OLD", table).join(", ");
    let update = format!("herald.{}", q(&function_name(&table.name, "wupd")));
    let delete = format!("herald.{}", q(&function_name(&table.name, "wdel")));
    let prefix = lit(MESSAGE_PREFIX);
    let identity_changed = compare_all(&identity_columns(table), types, false);
    format!(
        r#"
CREATE OR REPLACE FUNCTION {update}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF {identity_changed} THEN
        PERFORM pg_logical_emit_message(true, {prefix}, json_build_array('U', {name}, {old})::text);
    ELSE
        PERFORM pg_logical_emit_message(true, {prefix}, json_build_array('S', {name}, {new_id})::text);
    END IF;
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS "herald_capture_wal_upd" ON {target};
CREATE TRIGGER "herald_capture_wal_upd" AFTER UPDATE ON {target} FOR EACH ROW
    WHEN ({identity_changed} OR {unchanged})
    EXECUTE FUNCTION {update}();
CREATE OR REPLACE FUNCTION {delete}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_logical_emit_message(true, {prefix}, json_build_array('D', {name}, {old})::text);
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS "herald_capture_wal_del" ON {target};
CREATE TRIGGER "herald_capture_wal_del" AFTER DELETE ON {target} FOR EACH ROW
    EXECUTE FUNCTION {delete}();
"#,
        new_id = text("NEW", Some(&table.id_column)),
        unchanged = nothing_watched_changed(table, types),
    )
}

/// Drops the outbox source's triggers from `table` (switching to the WAL).
pub fn drop_outbox_triggers_sql(table: &TableConfig) -> String {
    let target = qualified(&table.schema, table.pg_table());
    ["ins", "upd", "del", "trunc"]
        .iter()
        .map(|s| format!("DROP TRIGGER IF EXISTS \"herald_capture_{s}\" ON {target};\n"))
        .collect()
}

/// Drops the WAL source's triggers from `table` (switching to the outbox).
pub fn drop_wal_triggers_sql(table: &TableConfig) -> String {
    let target = qualified(&table.schema, table.pg_table());
    TRIGGERS.iter().map(|t| format!("DROP TRIGGER IF EXISTS \"{t}\" ON {target};\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> TableConfig {
        TableConfig {
            name: "res_users".into(),
            schema: "public".into(),
            table: None,
            id_column: "id".into(),
            key_columns: vec!["slug".into()],
            tenant_column: Some("tenant_id".into()),
            team_column: None,
            watch_columns: vec!["name".into()],
        }
    }

    #[test]
    fn the_update_trigger_fires_only_for_identity_changes_or_unwatched_updates() {
        let table = users();
        let sql = table_sql(&table, &ColumnTypes::new());
        assert!(sql.contains(
            "WHEN ((OLD.\"id\"::text IS DISTINCT FROM NEW.\"id\"::text OR OLD.\"tenant_id\"::text IS DISTINCT FROM \
             NEW.\"tenant_id\"::text OR OLD.\"slug\"::text IS DISTINCT FROM NEW.\"slug\"::text) OR \
             (OLD.\"id\"::text IS NOT DISTINCT FROM NEW.\"id\"::text AND OLD.\"name\"::text IS NOT DISTINCT FROM"
        ));
        assert!(
            sql.contains("json_build_array('D', 'res_users', OLD.\"tenant_id\"::text, OLD.\"id\"::text, NULL::text")
        );
        let publication = publication_sql(&[table], &CaptureConfig::default());
        assert!(publication.contains("SET TABLE \"public\".\"res_users\""));
    }

    #[test]
    fn columns_whose_equality_is_exact_are_compared_as_their_type() {
        let types: ColumnTypes = [("id", "bigint"), ("tenant_id", "text"), ("slug", "citext"), ("name", "numeric")]
            .into_iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect();
        let sql = table_sql(&users(), &types);
        assert!(sql.contains("OLD.\"id\" IS DISTINCT FROM NEW.\"id\" OR"), "{sql}");
        assert!(sql.contains("OLD.\"tenant_id\" COLLATE \"C\" IS DISTINCT FROM NEW.\"tenant_id\" COLLATE \"C\""));
        // citext's `=` ignores case and numeric's ignores scale: a cache key
        // built from the text would change unseen.
        assert!(sql.contains("OLD.\"slug\"::text IS DISTINCT FROM NEW.\"slug\"::text"));
        assert!(sql.contains("OLD.\"name\"::text IS NOT DISTINCT FROM NEW.\"name\"::text"));
    }
}
