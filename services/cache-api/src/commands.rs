//! Write commands (`[[cache.commands]]`) checked against the database and
//! ready to run: the statement with `$tenant` bound by Herald, each caller
//! parameter's canonical text, and the tags of the entries it changes.

use herald_core::config::{CommandConfig, OverlayConfig, ResourceConfig, WriteModel};
use herald_core::keys::TenantId;
use postgres_types::ToSql;
use tokio_postgres::error::SqlState;

use crate::error::{Error, Result};
use crate::resource::{ParamKind, Text, canonical_params, connection_failed, db_message, render};

/// A write-behind command's overlay, by parameter index.
#[derive(Debug)]
pub struct Overlay {
    pub resource: String,
    /// For each parameter of the resource, in its order: the command's.
    pub params: Vec<usize>,
    /// JSON field → the command's parameter.
    pub set: Vec<(String, usize)>,
}

/// A command ready to run.
#[derive(Debug)]
pub struct Command {
    pub name: String,
    pub params: Vec<String>,
    pub model: WriteModel,
    pub overlay: Option<Overlay>,
    /// The statement with `$tenant` as `$n+1`.
    sql: String,
    tags: Vec<String>,
    kinds: Vec<ParamKind>,
}

impl Command {
    /// Checks `config` against the database (the statement prepares; `$k`
    /// tags use parameters whose text Herald can make canonical).
    /// `resources` are the configured ones (an overlay names one).
    pub async fn compile(
        config: &CommandConfig,
        resources: &[ResourceConfig],
        db: &tokio_postgres::Client,
    ) -> anyhow::Result<Self> {
        let at = format!("cache.commands ({})", config.name);
        let n = config.params.len();
        let sql = config.sql.replace("$tenant", &format!("${}", n + 1));
        let stmt =
            db.prepare(&sql).await.map_err(|e| anyhow::anyhow!("{at}.sql: does not prepare: {}", db_message(&e)))?;
        let kinds: Vec<ParamKind> = stmt.params().iter().take(n).map(ParamKind::of).collect();
        for tag in &config.tags {
            for k in ResourceConfig::placeholders(tag) {
                if kinds.get(k.wrapping_sub(1)) == Some(&ParamKind::Other) {
                    anyhow::bail!(
                        "{at}.tags: {tag:?} uses ${k} ({}), which Postgres reads as {}: Herald cannot make its \
                         text canonical, so the tag could miss the entries it names",
                        config.params[k - 1],
                        stmt.params()[k - 1]
                    );
                }
            }
        }
        let index = |r: &String| OverlayConfig::param_index(r).unwrap_or(0);
        // The config check made sure the resource exists and every
        // reference is a parameter.
        let overlay = config.overlay.as_ref().map(|o| {
            let resource = resources.iter().find(|r| r.name == o.resource);
            Overlay {
                resource: o.resource.clone(),
                params: resource.map_or_else(Vec::new, |r| r.params.iter().map(|p| index(&o.params[p])).collect()),
                set: o.set.iter().map(|(field, r)| (field.clone(), index(r))).collect(),
            }
        });
        Ok(Self {
            name: config.name.clone(),
            params: config.params.clone(),
            model: config.model,
            overlay,
            sql,
            tags: config.tags.clone(),
            kinds,
        })
    }

    /// The caller's parameters, checked and canonical (the text capture's
    /// tags carry for the same value).
    pub fn canonical_params(&self, params: &[String]) -> Result<Vec<String>> {
        if params.len() != self.params.len() {
            return Err(Error::InvalidArgument(format!(
                "command {:?} takes {} parameter(s) ({}), got {}",
                self.name,
                self.params.len(),
                self.params.join(", "),
                params.len()
            )));
        }
        canonical_params(&format!("command {:?}", self.name), &self.params, &self.kinds, params)
    }

    /// The tags the command changes, for canonical `params`.
    pub fn tags(&self, params: &[String]) -> Vec<String> {
        let mut tags: Vec<String> = self.tags.iter().map(|t| render(t, params, |_| None)).collect();
        tags.sort();
        tags.dedup();
        tags
    }

    /// The overlay's patch for canonical `params`: each field's parameter as
    /// JSON (integers as numbers, the rest as strings).
    pub fn patch(&self, params: &[String]) -> serde_json::Map<String, serde_json::Value> {
        let Some(overlay) = &self.overlay else { return serde_json::Map::new() };
        overlay
            .set
            .iter()
            .map(|(field, i)| {
                let text = params.get(*i).cloned().unwrap_or_default();
                let value = match self.kinds.get(*i) {
                    Some(ParamKind::Int(..)) => text.parse::<i64>().map_or(serde_json::Value::String(text), Into::into),
                    _ => serde_json::Value::String(text),
                };
                (field.clone(), value)
            })
            .collect()
    }

    /// The overlay resource's parameters for the command's canonical `params`.
    pub fn overlay_params(&self, params: &[String]) -> Vec<String> {
        self.overlay.as_ref().map_or_else(Vec::new, |o| o.params.iter().map(|i| params[*i].clone()).collect())
    }

    /// The JSON Schema of parameter `i` (the OpenAPI document's).
    pub fn param_schema(&self, i: usize) -> serde_json::Value {
        self.kinds.get(i).map_or_else(|| serde_json::json!({ "type": "string" }), |k| k.schema())
    }

    /// Runs the statement for `tenant` in its own transaction and commits;
    /// the rows it changed.
    pub async fn execute(
        &self,
        client: &mut deadpool_postgres::Client,
        tenant: &TenantId,
        params: &[String],
    ) -> Result<u64> {
        let tx = client.transaction().await.map_err(|e| self.error(&e))?;
        let rows = self.execute_in(&tx, tenant, params).await.map_err(|e| self.error(&e))?;
        tx.commit().await.map_err(|e| {
            if connection_failed(&e) {
                Error::Unavailable(format!(
                    "command {:?}: the connection failed during COMMIT, so whether it committed is unknown: {}",
                    self.name,
                    db_message(&e)
                ))
            } else {
                self.error(&e)
            }
        })?;
        Ok(rows)
    }

    /// Runs the statement for `tenant` in the caller's transaction `tx`.
    pub async fn execute_in(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        tenant: &TenantId,
        params: &[String],
    ) -> std::result::Result<u64, tokio_postgres::Error> {
        let mut args: Vec<Text<'_>> = params.iter().map(|p| Text(p)).collect();
        args.push(Text(tenant.as_str()));
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let stmt = tx.prepare_cached(&self.sql).await?;
        tx.execute(&stmt, &refs).await
    }

    /// A failed statement: bad parameter text and refused changes are the
    /// caller's error; a lost connection means Postgres is unavailable.
    fn error(&self, e: &tokio_postgres::Error) -> Error {
        let name = &self.name;
        if connection_failed(e) {
            return Error::Unavailable(format!("postgres: {}", db_message(e)));
        }
        if e.code() == Some(&SqlState::QUERY_CANCELED) {
            return Error::Unavailable(format!(
                "command {name:?}: the statement ran longer than cache.query_timeout_ms and was cancelled"
            ));
        }
        let class = e.code().map(|c| &c.code()[..2]);
        match (class, e.as_db_error()) {
            // Data exceptions: the parameter's text is not a value of its type.
            (Some("22"), _) => Error::InvalidArgument(format!("command {name:?}: bad parameter: {}", db_message(e))),
            // Integrity constraints: the change was refused.
            (Some("23"), Some(db)) => Error::InvalidArgument(format!(
                "command {name:?}: the change violates {}",
                db.constraint().map_or_else(|| "a constraint".to_string(), |c| format!("constraint {c:?}"))
            )),
            _ => {
                // Postgres's text may show the schema or data: it goes to the
                // log, the caller gets an id to find it there.
                let id = format!("{:08x}", rand::random::<u32>());
                tracing::error!(command = %name, error_id = %id, error = %db_message(e), "command failed");
                Error::Internal(format!("command {name:?}: the statement failed (error id {id} in the node's log)"))
            }
        }
    }
}
