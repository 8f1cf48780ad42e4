//! The `herald` schema: outbox, dead-letter table, doorbell functions and the
//! per-table statement triggers, generated from configuration.
//!
//! One outbox row per statement, table, tenant and chunk of `chunk_rows`
//! rows: the trigger reads the statement's transition tables, keeps the rows
//! whose watched columns changed, and aggregates ids, tags and teams. Trigger
//! functions are generated per table with static SQL (no `EXECUTE`), so
//! Postgres caches their plans.

use herald_core::config::{CaptureConfig, TableConfig};
use herald_core::hash::advisory_lock_id;

/// Bumped whenever the generated objects change shape.
pub const SCHEMA_VERSION: i32 = 1;
/// The doorbell channel writers `NOTIFY` while capture is idle.
pub const DOORBELL_CHANNEL: &str = "herald_doorbell";

/// Held (session-level, exclusive) by a capture that is draining: writers
/// that cannot take it shared skip the NOTIFY.
pub fn busy_lock_id() -> i64 {
    advisory_lock_id("herald:doorbell:busy")
}

/// Held shared by every writer until commit; capture takes it exclusive for
/// an instant before going idle, which proves no writer that skipped the
/// NOTIFY is still in flight.
pub fn barrier_lock_id() -> i64 {
    advisory_lock_id("herald:doorbell:barrier")
}

/// Serialises concurrent installs.
pub fn install_lock_id() -> i64 {
    advisory_lock_id("herald:install")
}

/// Quotes an identifier (already validated by config).
fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The tables and functions every installation has.
pub fn base_sql() -> String {
    let busy = busy_lock_id();
    let barrier = barrier_lock_id();
    format!(
        r#"
CREATE SCHEMA IF NOT EXISTS herald;

CREATE TABLE IF NOT EXISTS herald.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per statement, table, tenant and chunk, written in the writer's
-- transaction. Capture drains it into the Redis stream and deletes the rows.
CREATE TABLE IF NOT EXISTS herald.outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name  text        NOT NULL,
    op          text        NOT NULL,
    tenant      text,
    ids         text[]      NOT NULL DEFAULT '{{}}',
    tags        text[]      NOT NULL DEFAULT '{{}}',
    teams       text[]      NOT NULL DEFAULT '{{}}',
    txid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    changed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    traceparent text
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000);

-- Rows capture could not turn into events: kept with the reason, never lost.
CREATE TABLE IF NOT EXISTS herald.dead_letter (
    id          bigint PRIMARY KEY,
    table_name  text,
    op          text,
    tenant      text,
    ids         text[],
    tags        text[],
    teams       text[],
    txid        xid8,
    changed_at  timestamptz,
    traceparent text,
    reason      text        NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);

-- The doorbell. Every writer holds the barrier lock shared until commit; it
-- notifies only when no capture is busy (the busy lock is free), so under
-- load writers never pay NOTIFY's commit-time lock.
CREATE OR REPLACE FUNCTION herald.ring() RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({barrier});
    IF pg_try_advisory_xact_lock_shared({busy}) THEN
        PERFORM pg_notify('{DOORBELL_CHANNEL}', '');
    END IF;
END
$fn$;

-- Called by a busy capture (holding the busy lock) that found the outbox
-- empty. Succeeds only when no writer is in flight: then every writer that
-- skipped the doorbell has committed (or aborted), and every later writer
-- will ring. Releases the busy lock on success.
CREATE OR REPLACE FUNCTION herald.try_idle() RETURNS boolean
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT pg_try_advisory_lock({barrier}) THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_unlock({busy});
    PERFORM pg_advisory_unlock({barrier});
    RETURN true;
END
$fn$;
"#
    )
}

/// Trigger functions and triggers of one watched table.
pub fn table_sql(table: &TableConfig, capture: &CaptureConfig) -> String {
    let name = &table.name;
    let target = format!("{}.{}", q(&table.schema), q(table.pg_table()));
    let fn_base = format!("capture_{name}");
    let mut sql = String::new();
    for (op, suffix, event, body) in [
        ("I", "ins", "INSERT", images_of("n", "new_rows", table)),
        ("D", "del", "DELETE", images_of("o", "old_rows", table)),
        ("U", "upd", "UPDATE", update_images(table)),
    ] {
        let function = format!("herald.{}", q(&format!("{fn_base}_{suffix}")));
        let insert = outbox_insert(table, op, &body, capture.chunk_rows);
        let referencing = match event {
            "INSERT" => "REFERENCING NEW TABLE AS new_rows",
            "DELETE" => "REFERENCING OLD TABLE AS old_rows",
            _ => "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        };
        let trigger = q(&format!("herald_capture_{suffix}"));
        sql.push_str(&format!(
            r#"
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    emitted bigint;
BEGIN
{insert}
    GET DIAGNOSTICS emitted = ROW_COUNT;
    IF emitted > 0 THEN
        PERFORM herald.ring();
    END IF;
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS {trigger} ON {target};
CREATE TRIGGER {trigger} AFTER {event} ON {target}
    {referencing}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();
"#
        ));
    }
    let all_tenants = table.tenant_column.is_some();
    let function = format!("herald.{}", q(&format!("{fn_base}_trunc")));
    sql.push_str(&format!(
        r#"
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO herald.outbox (table_name, op, tenant, tags, traceparent)
    VALUES ({name_lit}, 'T', {tenant}, ARRAY[{name_lit}],
            nullif(current_setting('herald.traceparent', true), ''));
    PERFORM herald.ring();
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS "herald_capture_trunc" ON {target};
CREATE TRIGGER "herald_capture_trunc" AFTER TRUNCATE ON {target}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();
"#,
        name_lit = lit(name),
        // NULL tenant with op T on a tenant table means "every tenant".
        tenant = if all_tenants { "'*'" } else { "NULL" },
    ));
    sql
}

/// `SELECT` of the image columns (tenant, id, team, k0..kn) of `alias`.
fn image_columns(alias: &str, table: &TableConfig) -> String {
    let col = |c: &Option<String>| match c {
        Some(c) => format!("{alias}.{}::text", q(c)),
        None => "NULL::text".to_string(),
    };
    let mut cols = vec![
        format!("{} AS tenant", col(&table.tenant_column)),
        format!("{alias}.{}::text AS id", q(&table.id_column)),
        format!("{} AS team", col(&table.team_column)),
    ];
    for (i, k) in table.key_columns.iter().enumerate() {
        cols.push(format!("{alias}.{}::text AS k{i}", q(k)));
    }
    cols.join(", ")
}

fn images_of(alias: &str, transition: &str, table: &TableConfig) -> String {
    format!("SELECT {} FROM {transition} {alias}", image_columns(alias, table))
}

/// The columns whose change makes an update matter: the configured ones plus
/// every column a tag, the tenant or the team is derived from.
pub fn watched_columns(table: &TableConfig) -> Vec<String> {
    if table.watch_columns.is_empty() {
        return Vec::new();
    }
    let mut cols = table.watch_columns.clone();
    cols.extend(table.key_columns.iter().cloned());
    cols.extend(table.tenant_column.iter().cloned());
    cols.extend(table.team_column.iter().cloned());
    cols.push(table.id_column.clone());
    cols.sort();
    cols.dedup();
    cols
}

fn update_images(table: &TableConfig) -> String {
    let id = q(&table.id_column);
    let watched = watched_columns(table);
    let changed = if watched.is_empty() {
        "o::text IS DISTINCT FROM n::text".to_string()
    } else {
        let side = |a: &str| watched.iter().map(|c| format!("{a}.{}", q(c))).collect::<Vec<_>>().join(", ");
        format!("ROW({}) IS DISTINCT FROM ROW({})", side("o"), side("n"))
    };
    format!(
        "SELECT {old} FROM old_rows o LEFT JOIN new_rows n ON n.{id} = o.{id} \
         WHERE n.{id} IS NULL OR {changed} \
         UNION ALL \
         SELECT {new} FROM new_rows n LEFT JOIN old_rows o ON o.{id} = n.{id} \
         WHERE o.{id} IS NULL OR {changed}",
        old = image_columns("o", table),
        new = image_columns("n", table),
    )
}

/// The `INSERT INTO herald.outbox … SELECT` that aggregates the images.
fn outbox_insert(table: &TableConfig, op: &str, images: &str, chunk_rows: i64) -> String {
    let name = &table.name;
    let mut tags = vec![format!("ARRAY[{}]", lit(name))];
    tags.push(format!("array_agg(DISTINCT {} || id)", lit(&format!("{name}.{}=", table.id_column))));
    for (i, k) in table.key_columns.iter().enumerate() {
        tags.push(format!(
            "coalesce(array_agg(DISTINCT {} || k{i}) FILTER (WHERE k{i} IS NOT NULL), '{{}}')",
            lit(&format!("{name}.{k}="))
        ));
    }
    format!(
        "    INSERT INTO herald.outbox (table_name, op, tenant, ids, tags, teams, traceparent)
    SELECT {name_lit}, '{op}', tenant, array_agg(DISTINCT id),
           {tags},
           coalesce(array_agg(DISTINCT team) FILTER (WHERE team IS NOT NULL), '{{}}'),
           nullif(current_setting('herald.traceparent', true), '')
    FROM (SELECT img.*, (dense_rank() OVER (PARTITION BY tenant ORDER BY id) - 1) / {chunk_rows} AS chunk
          FROM ({images}) img) chunked
    GROUP BY tenant, chunk;",
        name_lit = lit(name),
        tags = tags.join("\n           || "),
    )
}

/// Everything `install` applies, in order (for `install --print`).
pub fn full_sql(tables: &[TableConfig], capture: &CaptureConfig) -> String {
    let mut sql = base_sql();
    for table in tables {
        sql.push_str(&format!("\n-- table {}\n", table.name));
        sql.push_str(&table_sql(table, capture));
    }
    sql.push_str(&format!(
        "\nINSERT INTO herald.meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}')\n    \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value;\n"
    ));
    sql
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
            key_columns: vec!["website_slug".into(), "callsign".into()],
            tenant_column: Some("tenant_id".into()),
            team_column: Some("team_id".into()),
            watch_columns: vec!["name".into()],
        }
    }

    #[test]
    fn watched_columns_include_everything_tags_depend_on() {
        assert_eq!(watched_columns(&users()), ["callsign", "id", "name", "team_id", "tenant_id", "website_slug"]);
        let mut all = users();
        all.watch_columns.clear();
        assert!(watched_columns(&all).is_empty());
    }

    #[test]
    fn generated_sql_names_what_it_should() {
        let sql = full_sql(&[users()], &CaptureConfig::default());
        assert!(sql.contains("REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"));
        assert!(sql.contains("'res_users.website_slug=' || k0"));
        assert!(sql.contains("/ 500 AS chunk"));
        assert!(!sql.contains("EXECUTE format"), "trigger functions must use static SQL");
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(lit("a'b"), "'a''b'");
        assert_eq!(q("a\"b"), "\"a\"\"b\"");
    }
}
