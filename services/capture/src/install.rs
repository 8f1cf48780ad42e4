//! `herald-capture install`: applies the schema idempotently. Concurrent
//! installs (several capture instances starting at once) serialise on an
//! advisory lock whose id is a fixed hash.

use std::collections::{HashMap, HashSet};

use herald_core::config::{Config, OldImages};
use tokio_postgres::{Client, GenericClient};

use crate::error::{Error, Result};
use crate::schema::{SCHEMA_VERSION, base_sql, install_lock_id, q, qualified};
use crate::source::{self, Source};
use crate::wal;
use crate::wal::schema::ColumnTypes;

/// Column types of the configured tables, by table name (`tables[].name`).
pub type Catalog = HashMap<String, ColumnTypes>;

/// What an install did.
#[derive(Debug)]
pub struct InstallReport {
    pub source: Source,
    /// With the WAL source: the slot was created (now or earlier) …
    pub slot: Option<wal::slot::Ensured>,
    pub tables: Vec<String>,
    /// Herald triggers removed from tables that are no longer configured.
    pub removed_triggers: Vec<String>,
    /// Herald trigger functions no trigger used any more, dropped.
    pub removed_functions: Vec<String>,
}

/// Everything install applies in its transaction for `source`, in order
/// (also what `install --print` shows), for tables whose columns have the
/// types in `catalog` (the WAL source's update trigger compares by type).
pub fn sql(config: &Config, source: Source, catalog: &Catalog) -> String {
    let no_types = ColumnTypes::new();
    let mut sql = base_sql();
    for table in &config.tables {
        sql.push_str(&format!("\n-- table {} ({} source)\n", table.name, source.as_str()));
        match (source, config.capture.old_images) {
            (Source::Outbox, _) => {
                sql.push_str(&wal::schema::drop_wal_triggers_sql(table));
                sql.push_str(&crate::schema::table_sql(table, &config.capture));
            }
            (Source::Wal, OldImages::ReplicaIdentity) => {
                sql.push_str(&wal::schema::drop_outbox_triggers_sql(table));
                sql.push_str(&wal::schema::drop_wal_triggers_sql(table));
                sql.push_str(&wal::schema::replica_identity_full_sql(table));
            }
            (Source::Wal, OldImages::Triggers) => {
                sql.push_str(&wal::schema::drop_outbox_triggers_sql(table));
                sql.push_str(&wal::schema::table_sql(table, catalog.get(&table.name).unwrap_or(&no_types)));
            }
        }
    }
    let full: &[_] = match (source, config.capture.old_images) {
        (Source::Wal, OldImages::ReplicaIdentity) => &config.tables,
        _ => &[],
    };
    sql.push_str("\n-- the identity of every other table Herald set to REPLICA IDENTITY FULL, back\n");
    sql.push_str(&wal::schema::replica_identity_restore_sql(full));
    match source {
        Source::Outbox => {
            sql.push_str(&format!("\nDROP PUBLICATION IF EXISTS {};\n", q(&config.capture.publication)));
        }
        Source::Wal => {
            sql.push('\n');
            sql.push_str(&wal::schema::publication_sql(&config.tables, &config.capture));
        }
    }
    sql.push_str(&format!(
        "\nINSERT INTO herald.meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}'), ('source', '{}')\n    \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value;\n",
        source.as_str()
    ));
    if source == Source::Wal {
        sql.push_str(&format!(
            "\n-- Then, outside the transaction, unless it exists (a slot nobody reads pins WAL forever:\n\
             -- `herald-capture uninstall --drop-slot` removes it):\n\
             -- SELECT pg_create_logical_replication_slot('{}', 'pgoutput');\n",
            config.capture.slot
        ));
    }
    sql
}

/// Reads the configured tables' column types from the database (base types
/// of domains, as `regtype` names). A table that does not exist has none.
pub async fn column_types(client: &impl GenericClient, config: &Config) -> Result<Catalog> {
    let mut catalog = Catalog::new();
    for table in &config.tables {
        let rows = client
            .query(
                "SELECT a.attname::text, \
                 (CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END)::regtype::text \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&qualified(&table.schema, table.pg_table())],
            )
            .await?;
        catalog.insert(table.name.clone(), rows.iter().map(|r| (r.get(0), r.get(1))).collect());
    }
    Ok(catalog)
}

/// Installs (or updates) the `herald` schema and the capture objects of
/// every configured table for the chosen source, in one transaction; with
/// the WAL source then makes sure the slot exists.
pub async fn install(client: &mut Client, config: &Config) -> Result<InstallReport> {
    let chosen = source::choose(config.capture.source, source::probe(&*client).await?)?;
    // The (empty) publication, then the slot, then the triggers: the slot's
    // start precedes the commit that publishes the tables (and, switching from the outbox, drops the
    // outbox triggers), so no write falls between the two sources. Writes
    // before that commit are in the outbox, which capture drains first.
    let slot = match chosen {
        Source::Wal => {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&install_lock_id()]).await?;
            tx.batch_execute(&base_sql()).await?;
            tx.batch_execute(&wal::schema::publication_create_sql(&config.capture)).await?;
            tx.commit().await?;
            Some(wal::slot::ensure(client, &config.capture.slot).await?)
        }
        Source::Outbox => None,
    };
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&install_lock_id()]).await?;

    let has_meta: bool = tx.query_one("SELECT to_regclass('herald.meta') IS NOT NULL", &[]).await?.get(0);
    let installed: Option<String> = if has_meta {
        tx.query_opt("SELECT value FROM herald.meta WHERE key = 'schema_version'", &[]).await?.map(|row| row.get(0))
    } else {
        None
    };
    if let Some(v) = installed.as_deref().and_then(|v| v.parse::<i32>().ok())
        && v > SCHEMA_VERSION
    {
        return Err(Error::Schema(format!(
            "database has herald schema version {v}, this capture knows {SCHEMA_VERSION}: upgrade capture"
        )));
    }

    let catalog = column_types(&tx, config).await?;
    let mut targets = HashSet::new();
    for (i, table) in config.tables.iter().enumerate() {
        let target = format!("{}.{}", table.schema, table.pg_table());
        let columns = &catalog[&table.name];
        if columns.is_empty() {
            return Err(Error::Schema(format!("tables[{i}] ({}): table {target} does not exist", table.name)));
        }
        let mut wanted: Vec<(&str, &str)> = vec![("id_column", &table.id_column)];
        wanted.extend(table.key_columns.iter().map(|c| ("key_columns", c.as_str())));
        wanted.extend(table.watch_columns.iter().map(|c| ("watch_columns", c.as_str())));
        wanted.extend(table.tenant_column.iter().map(|c| ("tenant_column", c.as_str())));
        wanted.extend(table.team_column.iter().map(|c| ("team_column", c.as_str())));
        for (key, column) in wanted {
            if !columns.contains_key(column) {
                return Err(Error::Schema(format!(
                    "tables[{i}] ({}).{key}: column {column:?} does not exist in {target}",
                    table.name
                )));
            }
        }
        // Without FULL, pgoutput needs a key to send an UPDATE at all.
        if chosen == Source::Wal && config.capture.old_images == OldImages::Triggers {
            let identity = tx
                .query_one(
                    "SELECT c.relreplident::text, EXISTS (SELECT 1 FROM pg_index i \
                     WHERE i.indrelid = c.oid AND i.indisprimary) FROM pg_class c WHERE c.oid = to_regclass($1)",
                    &[&qualified(&table.schema, table.pg_table())],
                )
                .await?;
            let (mut identity, primary_key): (String, bool) = (identity.get(0), identity.get(1));
            // FULL that Herald set goes back to what it was before.
            let before = match has_meta {
                true => tx
                    .query_opt(
                        "SELECT value FROM herald.meta WHERE key = $1",
                        &[&wal::schema::identity_meta_key(table)],
                    )
                    .await?
                    .map(|row| row.get::<_, String>(0)),
                false => None,
            };
            if identity == "f"
                && let Some(before) = before
            {
                identity = match before.as_str() {
                    "default" => "d",
                    "nothing" => "n",
                    _ => "i",
                }
                .to_string();
            }
            if identity == "n" || (identity == "d" && !primary_key) {
                return Err(Error::Schema(format!(
                    "tables[{i}] ({}): {target} has no replica identity (no primary key): with the WAL source \
                     and capture.old_images = \"triggers\" every UPDATE of it would fail; add a primary key, or use \
                     capture.old_images = \"replica_identity\"",
                    table.name
                )));
            }
        }
        targets.insert((table.schema.clone(), table.pg_table().to_string()));
    }

    tx.batch_execute(&sql(config, chosen, &catalog)).await?;

    // Only triggers Herald made: named like ours *and* running a function in
    // the `herald` schema. Any role that can create a table can name a
    // trigger anything, so every catalog name is quoted.
    let mut removed = Vec::new();
    let rows = tx
        .query(
            "SELECT n.nspname::text, c.relname::text, t.tgname::text FROM pg_trigger t \
             JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace \
             WHERE t.tgname LIKE 'herald\\_capture\\_%' AND NOT t.tgisinternal AND pn.nspname = 'herald'",
            &[],
        )
        .await?;
    for row in rows {
        let (schema, relation, trigger): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        if !targets.contains(&(schema.clone(), relation.clone())) {
            tx.batch_execute(&format!("DROP TRIGGER IF EXISTS {} ON {}", q(&trigger), qualified(&schema, &relation)))
                .await?;
            removed.push(format!("{schema}.{relation}.{trigger}"));
        }
    }
    // Trigger functions no trigger uses any more (a table removed from the
    // config, or a function renamed); a function still in use cannot be
    // dropped without CASCADE, so a concurrent install's cannot go.
    let orphans = tx
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'herald' AND p.proname LIKE 'capture\\_%' \
             AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)",
            &[],
        )
        .await?;
    let mut removed_functions = Vec::new();
    for row in orphans {
        let function: String = row.get(0);
        tx.batch_execute(&format!("DROP FUNCTION IF EXISTS herald.{}()", q(&function))).await?;
        removed_functions.push(function);
    }
    tx.commit().await?;
    Ok(InstallReport {
        source: chosen,
        slot,
        tables: config.tables.iter().map(|t| t.name.clone()).collect(),
        removed_triggers: removed,
        removed_functions,
    })
}

/// What an uninstall did.
#[derive(Debug, Default)]
pub struct UninstallReport {
    pub removed_triggers: usize,
    pub slot_dropped: bool,
    /// The slot still exists (kept without `--drop-slot`): it pins WAL.
    pub slot_kept: bool,
}

/// Removes every capture trigger and function and the publication, and puts
/// back the replica identity of every table Herald set to FULL; with
/// `drop_slot` the replication slot too. The `herald` schema (outbox, dead
/// letters) stays.
pub async fn uninstall(client: &mut Client, config: &Config, drop_slot: bool) -> Result<UninstallReport> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&install_lock_id()]).await?;
    let rows = tx
        .query(
            "SELECT n.nspname::text, c.relname::text, t.tgname::text FROM pg_trigger t \
             JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace \
             WHERE t.tgname LIKE 'herald\\_capture\\_%' AND NOT t.tgisinternal AND pn.nspname = 'herald'",
            &[],
        )
        .await?;
    let mut report = UninstallReport { removed_triggers: rows.len(), ..Default::default() };
    for row in rows {
        let (schema, relation, trigger): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        tx.batch_execute(&format!("DROP TRIGGER IF EXISTS {} ON {}", q(&trigger), qualified(&schema, &relation)))
            .await?;
    }
    let functions = tx
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'herald' AND p.proname LIKE 'capture\\_%'",
            &[],
        )
        .await?;
    for row in functions {
        tx.batch_execute(&format!("DROP FUNCTION IF EXISTS herald.{}()", q(&row.get::<_, String>(0)))).await?;
    }
    tx.batch_execute(&wal::schema::replica_identity_restore_sql(&[])).await?;
    tx.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", q(&config.capture.publication))).await?;
    if tx.query_one("SELECT to_regclass('herald.meta') IS NOT NULL", &[]).await?.get(0) {
        tx.execute("DELETE FROM herald.meta WHERE key = 'source'", &[]).await?;
    }
    tx.commit().await?;
    if drop_slot {
        report.slot_dropped = wal::slot::drop_slot(client, &config.capture.slot).await?;
    } else {
        report.slot_kept = wal::slot::state(client, &config.capture.slot).await?.exists;
    }
    Ok(report)
}
