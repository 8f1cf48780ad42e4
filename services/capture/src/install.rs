//! `herald-capture install`: applies the schema idempotently. Concurrent
//! installs (several capture instances starting at once) serialise on an
//! advisory lock whose id is a fixed hash.

use std::collections::HashSet;

use herald_core::config::Config;
use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::schema::{SCHEMA_VERSION, full_sql, install_lock_id, q, qualified};

/// What an install did.
#[derive(Debug, Default)]
pub struct InstallReport {
    pub tables: Vec<String>,
    /// Herald triggers removed from tables that are no longer configured.
    pub removed_triggers: Vec<String>,
    /// Herald trigger functions no trigger used any more, dropped.
    pub removed_functions: Vec<String>,
}

/// Installs (or updates) the `herald` schema and the triggers of every
/// configured table, in one transaction.
pub async fn install(client: &mut Client, config: &Config) -> Result<InstallReport> {
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

    let mut targets = HashSet::new();
    for (i, table) in config.tables.iter().enumerate() {
        let target = format!("{}.{}", table.schema, table.pg_table());
        let columns: Vec<String> = tx
            .query(
                "SELECT attname::text FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                &[&qualified(&table.schema, table.pg_table())],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if columns.is_empty() {
            return Err(Error::Schema(format!("tables[{i}] ({}): table {target} does not exist", table.name)));
        }
        let mut wanted: Vec<(&str, &str)> = vec![("id_column", &table.id_column)];
        wanted.extend(table.key_columns.iter().map(|c| ("key_columns", c.as_str())));
        wanted.extend(table.watch_columns.iter().map(|c| ("watch_columns", c.as_str())));
        wanted.extend(table.tenant_column.iter().map(|c| ("tenant_column", c.as_str())));
        wanted.extend(table.team_column.iter().map(|c| ("team_column", c.as_str())));
        for (key, column) in wanted {
            if !columns.iter().any(|c| c == column) {
                return Err(Error::Schema(format!(
                    "tables[{i}] ({}).{key}: column {column:?} does not exist in {target}",
                    table.name
                )));
            }
        }
        targets.insert((table.schema.clone(), table.pg_table().to_string()));
    }

    tx.batch_execute(&full_sql(&config.tables, &config.capture)).await?;

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
        tables: config.tables.iter().map(|t| t.name.clone()).collect(),
        removed_triggers: removed,
        removed_functions,
    })
}
