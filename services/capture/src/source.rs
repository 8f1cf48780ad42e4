//! Choosing where changes come from: `capture.source`.
//!
//! `install` resolves `auto` once — `wal` when the database has
//! `wal_level = logical` and the role may replicate, else `outbox` — and
//! records the choice in `herald.meta` (`source`). `run` follows the record,
//! so installing and running can never disagree.

use herald_core::config::CaptureSource;
use tokio_postgres::GenericClient;

use crate::error::{Error, Result};

/// A resolved source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Wal,
    Outbox,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Wal => "wal",
            Source::Outbox => "outbox",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "wal" => Some(Source::Wal),
            "outbox" => Some(Source::Outbox),
            _ => None,
        }
    }
}

/// What the database allows.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub wal_level_logical: bool,
    pub may_replicate: bool,
}

pub async fn probe(client: &impl GenericClient) -> Result<Probe> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level') = 'logical', \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await?;
    Ok(Probe { wal_level_logical: row.get(0), may_replicate: row.get::<_, Option<bool>>(1).unwrap_or(false) })
}

/// The source to install for `configured` on a database that allows `probe`.
pub fn choose(configured: CaptureSource, probe: Probe) -> Result<Source> {
    let wal_ok = probe.wal_level_logical && probe.may_replicate;
    match configured {
        CaptureSource::Outbox => Ok(Source::Outbox),
        CaptureSource::Wal if wal_ok => Ok(Source::Wal),
        CaptureSource::Wal => Err(Error::Schema(format!(
            "capture.source = \"wal\" needs wal_level = logical (it is {}) and a role with REPLICATION ({}): \
             set wal_level = logical and restart Postgres, ALTER ROLE … REPLICATION, or use source = \"outbox\"",
            if probe.wal_level_logical { "logical" } else { "not" },
            if probe.may_replicate { "it has" } else { "it lacks" },
        ))),
        CaptureSource::Auto if wal_ok => Ok(Source::Wal),
        CaptureSource::Auto => {
            tracing::warn!(
                wal_level_logical = probe.wal_level_logical,
                may_replicate = probe.may_replicate,
                "capture.source = auto: using the outbox (statement triggers), which costs writers about half \
                 their throughput where the WAL source costs about a fifth; set wal_level = logical and grant \
                 REPLICATION to use it"
            );
            Ok(Source::Outbox)
        }
    }
}

/// The source recorded by the last install, if any.
pub async fn installed(client: &impl GenericClient) -> Result<Option<Source>> {
    let has_meta: bool = client.query_one("SELECT to_regclass('herald.meta') IS NOT NULL", &[]).await?.get(0);
    if !has_meta {
        return Ok(None);
    }
    let value: Option<String> =
        client.query_opt("SELECT value FROM herald.meta WHERE key = 'source'", &[]).await?.map(|r| r.get(0));
    // Installs before the WAL source existed recorded nothing: the outbox.
    Ok(Some(value.as_deref().and_then(Source::parse).unwrap_or(Source::Outbox)))
}

/// The source `run` uses: the installed one, which an explicit
/// configuration must match.
pub fn for_run(configured: CaptureSource, installed: Option<Source>) -> Result<Source> {
    let Some(installed) = installed else {
        return Err(Error::Schema("the herald schema is not installed: run `herald-capture install`".into()));
    };
    let wanted = match configured {
        CaptureSource::Auto => return Ok(installed),
        CaptureSource::Wal => Source::Wal,
        CaptureSource::Outbox => Source::Outbox,
    };
    if wanted != installed {
        return Err(Error::Schema(format!(
            "capture.source is {:?} but the database is installed for {:?}: run `herald-capture install` \
             with this configuration",
            wanted.as_str(),
            installed.as_str()
        )));
    }
    Ok(installed)
}
