//! The `herald` schema: outbox, dead-letter table, doorbell functions and the
//! per-table statement triggers, generated from configuration.
//!
//! One outbox row per statement, table and chunk of `chunk_rows` rows: the
//! trigger reads the statement's transition tables, keeps the rows whose
//! watched columns changed, and flattens their images (tenant, id, team, key
//! columns) into the row. Grouping by tenant and building tags happen in
//! capture (`events.rs`). Trigger functions are generated per table with
//! static SQL (no `EXECUTE`), so Postgres caches their plans.

use herald_core::config::{CaptureConfig, TableConfig};
use herald_core::hash::advisory_lock_id;

/// Bumped whenever the generated objects change shape.
pub const SCHEMA_VERSION: i32 = 1;
/// The doorbell channel writers `NOTIFY` while capture is idle.
pub const DOORBELL_CHANNEL: &str = "herald_doorbell";
/// How long one renewal of the doorbell lease keeps writers from ringing.
pub const LEASE_MS: i64 = 500;

/// Serialises concurrent installs.
pub fn install_lock_id() -> i64 {
    advisory_lock_id("herald:install")
}

/// Values per row image in `herald.outbox.rows`: tenant, id, team, then one
/// per key column.
pub fn image_width(table: &TableConfig) -> usize {
    3 + table.key_columns.len()
}

/// Quotes an identifier: the one helper every generated or catalog-derived
/// name goes through (a `"` inside is doubled), whatever its origin.
pub(crate) fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `schema.relation`, both quoted.
pub(crate) fn qualified(schema: &str, relation: &str) -> String {
    format!("{}.{}", q(schema), q(relation))
}

/// Quotes a string literal.
pub(crate) fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The tables and functions every installation has.
pub fn base_sql() -> String {
    format!(
        r#"
CREATE SCHEMA IF NOT EXISTS herald;

CREATE TABLE IF NOT EXISTS herald.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per statement, table and chunk of rows, written in the writer's
-- transaction. `rows` holds the row images flattened: for each row tenant,
-- id, team, then the key columns, as text. Capture turns them into events
-- (tags, tenants, chunks), appends them to the Redis stream and deletes the
-- rows. The identity caches values per backend so writers do not contend on
-- the sequence.
CREATE TABLE IF NOT EXISTS herald.outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY (CACHE 100) PRIMARY KEY,
    table_name  text        NOT NULL,
    op          text        NOT NULL,
    rows        text[]      NOT NULL DEFAULT '{{}}',
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
    rows        text[],
    txid        xid8,
    changed_at  timestamptz,
    traceparent text,
    reason      text        NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);

-- Write-behind commands applied by a cache-api writer, each recorded in the
-- transaction that applied it: a command whose id is here is never applied
-- again (a writer killed between its commit and its stream acknowledgement
-- finds it here and skips it). `enqueued_at` is Redis's time of the enqueue.
CREATE TABLE IF NOT EXISTS herald.applied_commands (
    tenant      text        NOT NULL,
    command_id  text        NOT NULL,
    command     text        NOT NULL,
    enqueued_at timestamptz NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant, command_id)
);

-- The doorbell lease: epoch milliseconds until which a capture is busy
-- draining. A sequence, because reading and setting it is immediate and
-- outside every transaction, and reading it costs a writer almost nothing.
CREATE SEQUENCE IF NOT EXISTS herald.doorbell_lease;

-- Writers ring (NOTIFY, which takes a database-wide lock at commit) only
-- while no capture holds the lease, so under load they never pay for it.
CREATE OR REPLACE FUNCTION herald.ring() RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    IF (SELECT last_value FROM herald.doorbell_lease) < (extract(epoch FROM clock_timestamp()) * 1000)::int8 THEN
        PERFORM pg_notify('{DOORBELL_CHANNEL}', '');
    END IF;
END
$fn$;
"#
    )
}

/// Trigger functions and triggers of one watched table.
pub fn table_sql(table: &TableConfig, capture: &CaptureConfig) -> String {
    let name = &table.name;
    let target = qualified(&table.schema, table.pg_table());
    let mut sql = String::new();
    for (op, suffix, event, images) in [
        ("I", "ins", "INSERT", images_of("n", "new_rows", table)),
        ("D", "del", "DELETE", images_of("o", "old_rows", table)),
        ("U", "upd", "UPDATE", update_images(table)),
    ] {
        let function = format!("herald.{}", q(&function_name(name, suffix)));
        let referencing = match event {
            "INSERT" => "REFERENCING NEW TABLE AS new_rows",
            "DELETE" => "REFERENCING OLD TABLE AS old_rows",
            _ => "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        };
        let trigger = q(&format!("herald_capture_{suffix}"));
        let image = (0..table.key_columns.len())
            .fold("_herald_r.tenant, _herald_r.id, _herald_r.team".to_string(), |acc, i| {
                acc + &format!(", _herald_r.k{i}")
            });
        sql.push_str(&format!(
            r#"
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    _herald_r record;
    _herald_images text[] := '{{}}';
    _herald_count int := 0;
    _herald_emitted boolean := false;
    _herald_trace text := nullif(current_setting('herald.traceparent', true), '');
BEGIN
    FOR _herald_r IN {images} LOOP
        _herald_images := _herald_images || ARRAY[{image}];
        _herald_count := _herald_count + 1;
        IF _herald_count >= {chunk} THEN
            INSERT INTO herald.outbox (table_name, op, rows, traceparent)
            VALUES ({name_lit}, '{op}', _herald_images, _herald_trace);
            _herald_emitted := true;
            _herald_images := '{{}}';
            _herald_count := 0;
        END IF;
    END LOOP;
    IF _herald_count > 0 THEN
        INSERT INTO herald.outbox (table_name, op, rows, traceparent)
        VALUES ({name_lit}, '{op}', _herald_images, _herald_trace);
        _herald_emitted := true;
    END IF;
    IF _herald_emitted THEN
        PERFORM herald.ring();
    END IF;
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS {trigger} ON {target};
CREATE TRIGGER {trigger} AFTER {event} ON {target}
    {referencing}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();
"#,
            name_lit = lit(name),
            chunk = capture.chunk_rows,
        ));
    }
    let function = format!("herald.{}", q(&function_name(name, "trunc")));
    sql.push_str(&format!(
        r#"
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO herald.outbox (table_name, op, traceparent)
    VALUES ({name_lit}, 'T', nullif(current_setting('herald.traceparent', true), ''));
    PERFORM herald.ring();
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS "herald_capture_trunc" ON {target};
CREATE TRIGGER "herald_capture_trunc" AFTER TRUNCATE ON {target}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();
"#,
        name_lit = lit(name),
    ));
    sql
}

/// Postgres's identifier limit; longer names are silently truncated.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// The name of a table's trigger function for `suffix` (ins, del, upd,
/// trunc). Table names may be up to 63 bytes, and Postgres would truncate
/// `capture_<name>_<suffix>` silently, making the four functions of a long
/// name (or two long names sharing a prefix) one object. A name that does
/// not fit is shortened and given a hash of the whole name instead of being
/// refused: every name the config accepts keeps working.
pub fn function_name(table: &str, suffix: &str) -> String {
    let plain = format!("capture_{table}_{suffix}");
    if plain.len() <= MAX_IDENTIFIER_BYTES {
        return plain;
    }
    let mut cut = 30.min(table.len());
    while !table.is_char_boundary(cut) {
        cut -= 1;
    }
    let hash = herald_core::hash::fnv1a64(table.as_bytes()) & 0xffff_ffff_ffff;
    format!("capture_{}_{hash:012x}_{suffix}", &table[..cut])
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
    // Compared as text: a column type without an equality operator (json,
    // point) must not break the writer's statement. Every reference is
    // qualified (`o.*`, never a bare `o`), because a bare name resolves to a
    // column first: a table with a column `n` would otherwise compare it.
    let changed = if watched.is_empty() {
        "(o.*)::text IS DISTINCT FROM (n.*)::text".to_string()
    } else {
        let side = |a: &str| watched.iter().map(|c| format!("{a}.{}::text", q(c))).collect::<Vec<_>>().join(", ");
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
        let sql = table_sql(&users(), &CaptureConfig::default());
        assert!(sql.contains("REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"));
        assert!(sql.contains("ARRAY[_herald_r.tenant, _herald_r.id, _herald_r.team, _herald_r.k0, _herald_r.k1]"));
        assert!(sql.contains("IF _herald_count >= 500 THEN"));
        assert!(!sql.contains("EXECUTE format"), "trigger functions must use static SQL");
    }

    #[test]
    fn function_names_fit_postgres_and_stay_distinct() {
        assert_eq!(function_name("res_users", "ins"), "capture_res_users_ins");
        let long = "a".repeat(63);
        let names: Vec<String> = ["ins", "del", "upd", "trunc"].iter().map(|s| function_name(&long, s)).collect();
        assert!(names.iter().all(|n| n.len() <= MAX_IDENTIFIER_BYTES), "{names:?}");
        assert_eq!(names.iter().collect::<std::collections::HashSet<_>>().len(), 4);
        let sibling = format!("{}b", "a".repeat(62));
        assert_ne!(function_name(&long, "ins"), function_name(&sibling, "ins"));
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(lit("a'b"), "'a''b'");
        assert_eq!(q("a\"b"), "\"a\"\"b\"");
    }
}
