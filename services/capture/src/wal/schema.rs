//! What the WAL source installs: a publication of the watched tables (row
//! inserts, updates and truncates; deletes come from a trigger) and, per
//! table, two row triggers that emit transactional logical messages only
//! where the stream lacks something (see `txn.rs` for the messages):
//!
//! * `herald_capture_wal_upd`, `AFTER UPDATE … FOR EACH ROW WHEN (…)`: fires
//!   only when the id, a key, the tenant or the team changed (old image
//!   wanted), or when no watched column changed (the update is dropped).
//!   An update of a watched column — the common case — fires nothing.
//! * `herald_capture_wal_del`, `AFTER DELETE … FOR EACH ROW`: the old image.
//!   Measured cheaper for writers than `REPLICA IDENTITY FULL`, which would
//!   log the whole old row of every UPDATE too (README, "What capture costs
//!   writers").

use herald_core::config::{CaptureConfig, TableConfig};

use super::txn::MESSAGE_PREFIX;
use crate::schema::{function_name, lit, q, qualified, watched_columns};

/// Names of the WAL source's triggers.
pub const TRIGGERS: [&str; 2] = ["herald_capture_wal_upd", "herald_capture_wal_del"];

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

/// `ROW(…)` of the columns that name a row's cache scope and tags.
fn identity_row(alias: &str, table: &TableConfig) -> String {
    let mut columns: Vec<&str> = vec![&table.id_column];
    columns.extend(table.tenant_column.as_deref());
    columns.extend(table.team_column.as_deref());
    columns.extend(table.key_columns.iter().map(String::as_str));
    let values: Vec<String> = columns.iter().map(|c| text(alias, Some(c))).collect();
    format!("ROW({})", values.join(", "))
}

/// True when no column that matters changed. Compared as text, like the
/// outbox trigger: a type without equality (json) must not break writers.
fn nothing_watched_changed(table: &TableConfig) -> String {
    let watched = watched_columns(table);
    if watched.is_empty() {
        return "(OLD.*)::text IS NOT DISTINCT FROM (NEW.*)::text".into();
    }
    let side = |alias: &str| watched.iter().map(|c| text(alias, Some(c))).collect::<Vec<_>>().join(", ");
    format!("ROW({}) IS NOT DISTINCT FROM ROW({})", side("OLD"), side("NEW"))
}

/// Creates the publication, empty, unless it exists. It must exist before
/// the slot is created: pgoutput looks publications up as of each change it
/// decodes, and a change older than the publication would fail the stream.
pub fn publication_create_sql(capture: &CaptureConfig) -> String {
    format!(
        "DO $herald$ BEGIN\n    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {}) THEN\n        \
         CREATE PUBLICATION {} WITH (publish = 'insert, update, truncate');\n    END IF;\nEND $herald$;\n",
        lit(&capture.publication),
        q(&capture.publication)
    )
}

/// The publication's operations and table list, set on every install.
pub fn publication_sql(tables: &[TableConfig], capture: &CaptureConfig) -> String {
    let name = q(&capture.publication);
    let mut sql = publication_create_sql(capture);
    sql.push_str(&format!("ALTER PUBLICATION {name} SET (publish = 'insert, update, truncate');\n"));
    if !tables.is_empty() {
        let list: Vec<String> = tables.iter().map(|t| qualified(&t.schema, t.pg_table())).collect();
        sql.push_str(&format!("ALTER PUBLICATION {name} SET TABLE {};\n", list.join(", ")));
    }
    sql
}

/// The two row triggers of one table.
pub fn table_sql(table: &TableConfig) -> String {
    let target = qualified(&table.schema, table.pg_table());
    let name = lit(&table.name);
    let old = image("OLD", table).join(", ");
    let update = format!("herald.{}", q(&function_name(&table.name, "wupd")));
    let delete = format!("herald.{}", q(&function_name(&table.name, "wdel")));
    let prefix = lit(MESSAGE_PREFIX);
    let (old_identity, new_identity) = (identity_row("OLD", table), identity_row("NEW", table));
    format!(
        r#"
CREATE OR REPLACE FUNCTION {update}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF {old_identity} IS DISTINCT FROM {new_identity} THEN
        PERFORM pg_logical_emit_message(true, {prefix}, json_build_array('U', {name}, {old})::text);
    ELSE
        PERFORM pg_logical_emit_message(true, {prefix}, json_build_array('S', {name}, {new_id})::text);
    END IF;
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS "herald_capture_wal_upd" ON {target};
CREATE TRIGGER "herald_capture_wal_upd" AFTER UPDATE ON {target} FOR EACH ROW
    WHEN ({old_identity} IS DISTINCT FROM {new_identity} OR {unchanged})
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
        unchanged = nothing_watched_changed(table),
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

    #[test]
    fn the_update_trigger_fires_only_for_identity_changes_or_unwatched_updates() {
        let table = TableConfig {
            name: "res_users".into(),
            schema: "public".into(),
            table: None,
            id_column: "id".into(),
            key_columns: vec!["slug".into()],
            tenant_column: Some("tenant_id".into()),
            team_column: None,
            watch_columns: vec!["name".into()],
        };
        let sql = table_sql(&table);
        assert!(sql.contains(
            "WHEN (ROW(OLD.\"id\"::text, OLD.\"tenant_id\"::text, OLD.\"slug\"::text) IS DISTINCT FROM \
             ROW(NEW.\"id\"::text, NEW.\"tenant_id\"::text, NEW.\"slug\"::text) OR ROW(OLD.\"id\"::text, \
             OLD.\"name\"::text, OLD.\"slug\"::text, OLD.\"tenant_id\"::text) IS NOT DISTINCT FROM"
        ));
        assert!(
            sql.contains("json_build_array('D', 'res_users', OLD.\"tenant_id\"::text, OLD.\"id\"::text, NULL::text")
        );
        let publication = publication_sql(&[table], &CaptureConfig::default());
        assert!(publication.contains("SET TABLE \"public\".\"res_users\""));
    }
}
