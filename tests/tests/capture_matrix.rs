//! The generated triggers must never break a writer's statement, whatever
//! the table's options, and must record what the statement changed.

use std::collections::{BTreeMap, BTreeSet};

use herald_capture::events::{OutboxRow, events_of};
use herald_capture::wal::pgoutput::{WalMessage, frame};
use herald_capture::wal::txn::Assembler;
use herald_core::config::TableConfig;
use herald_proto::v1::Operation;
use herald_tests::{Sandbox, Source};
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_on_a_table_without_watch_columns_succeeds() {
    // The reproduction, with the README's minimal config:
    // watch_columns left out (every column matters).
    let mut sb = Sandbox::start().await;
    sb.sql(
        "DROP TABLE res_users; \
         CREATE TABLE res_users (id bigserial PRIMARY KEY, tenant_id text, website_slug text, name text)",
    )
    .await;
    let config: herald_core::config::Config = herald_core::config::Config::load(
        "[[tables]]\nname = \"res_users\"\nkey_columns = [\"website_slug\"]\ntenant_column = \"tenant_id\"\n",
        &Default::default(),
    )
    .expect("config");
    sb.config.tables = config.tables;
    sb.install().await;
    sb.sql("INSERT INTO res_users (tenant_id, website_slug, name) VALUES ('acme', 'alice', 'A')").await;
    sb.sql("UPDATE res_users SET name = 'B'").await;
    assert_eq!(sb.scalar_i64("SELECT count(*) FROM herald.outbox WHERE op = 'U'").await, 1);
    sb.cleanup().await;
}

/// How the Postgres names of a case are spelled.
#[derive(Clone, Copy, Debug)]
enum Style {
    /// Ordinary lowercase names.
    Plain,
    /// Lowercase names that need quoting (reserved words) or that collide
    /// with the names the generated SQL uses (`n`, `o`, `tenant`, `k0`).
    Colliding,
    /// Mixed case, spaces and quotes. `Config::load` accepts only lowercase
    /// identifiers today, so these are reachable only by building the
    /// `TableConfig` directly; they prove the generator quotes every name.
    Mixed,
}

/// The Postgres names of one style.
struct Names {
    schema: &'static str,
    table: &'static str,
    id: &'static str,
    custom_id: &'static str,
    tenant: &'static str,
    team: &'static str,
    keys: [&'static str; 2],
    watched: &'static str,
    unwatched: &'static str,
}

fn names(style: Style) -> Names {
    match style {
        Style::Plain => Names {
            schema: "matrix",
            table: "users_",
            id: "id",
            custom_id: "user_no",
            tenant: "tenant_id",
            team: "team_id",
            keys: ["slug", "callsign"],
            watched: "name",
            unwatched: "note",
        },
        Style::Colliding => Names {
            schema: "group",
            table: "order_",
            id: "id",
            custom_id: "n",
            tenant: "tenant",
            team: "team",
            keys: ["k1", "k0"],
            watched: "o",
            unwatched: "select",
        },
        Style::Mixed => Names {
            schema: "Mixed Schema",
            table: "Res\"Users ",
            id: "Id",
            custom_id: "User No",
            tenant: "TenantId",
            team: "Team\"Id",
            keys: ["Slug", "Call Sign"],
            watched: "Name",
            unwatched: "Note",
        },
    }
}

/// One combination of table options.
#[derive(Clone, Copy, Debug)]
struct Case {
    index: usize,
    watch: bool,
    tenant: bool,
    team: bool,
    keys: usize,
    custom_id: bool,
    style: Style,
    other_schema: bool,
}

fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for style in [Style::Plain, Style::Colliding, Style::Mixed] {
        for other_schema in [false, true] {
            for watch in [false, true] {
                for tenant in [false, true] {
                    for team in [false, true] {
                        for keys in 0..=2 {
                            for custom_id in [false, true] {
                                let index = cases.len();
                                cases.push(Case { index, watch, tenant, team, keys, custom_id, style, other_schema });
                            }
                        }
                    }
                }
            }
        }
    }
    cases
}

impl Case {
    fn names(&self) -> Names {
        names(self.style)
    }

    fn name(&self) -> String {
        format!("m{}", self.index)
    }

    fn schema(&self) -> &'static str {
        if self.other_schema { self.names().schema } else { "public" }
    }

    fn pg_table(&self) -> String {
        format!("{}{}", self.names().table, self.index)
    }

    fn target(&self) -> String {
        format!("{}.{}", q(self.schema()), q(&self.pg_table()))
    }

    fn id(&self) -> &'static str {
        let n = self.names();
        if self.custom_id { n.custom_id } else { n.id }
    }

    fn keys(&self) -> Vec<&'static str> {
        self.names().keys[..self.keys].to_vec()
    }

    fn config(&self) -> TableConfig {
        let n = self.names();
        TableConfig {
            name: self.name(),
            schema: self.schema().into(),
            table: Some(self.pg_table()),
            id_column: self.id().into(),
            key_columns: self.keys().iter().map(|k| k.to_string()).collect(),
            tenant_column: self.tenant.then(|| n.tenant.to_string()),
            team_column: self.team.then(|| n.team.to_string()),
            watch_columns: if self.watch { vec![n.watched.to_string()] } else { vec![] },
        }
    }

    /// Every column exists whatever the options: what is configured decides
    /// what the trigger reads.
    fn create_sql(&self) -> String {
        let n = self.names();
        format!(
            "CREATE TABLE {} ({} bigint PRIMARY KEY, {} text, {} bigint, {} text, {} text, {} json, {} text)",
            self.target(),
            q(self.id()),
            q(n.tenant),
            q(n.team),
            q(n.keys[0]),
            q(n.keys[1]),
            q(n.watched),
            q(n.unwatched),
        )
    }
}

/// What the model says one row holds.
#[derive(Clone, Debug)]
struct Row {
    id: i64,
    tenant: &'static str,
    team: i64,
    keys: [String; 2],
}

/// The union of what a step's events carry.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    ops: BTreeSet<String>,
    ids: BTreeMap<String, BTreeSet<String>>,
    tags: BTreeSet<String>,
    teams: BTreeSet<String>,
    all_tenants: bool,
}

fn expected(case: &Case, op: &str, images: &[&Row]) -> Seen {
    let mut seen = Seen::default();
    if images.is_empty() {
        return seen;
    }
    seen.ops.insert(op.into());
    seen.tags.insert(case.name());
    for row in images {
        let tenant = if case.tenant { row.tenant } else { "" };
        seen.ids.entry(tenant.into()).or_default().insert(row.id.to_string());
        seen.tags.insert(format!("{}.{}={}", case.name(), case.id(), row.id));
        for (key, value) in case.keys().iter().zip(&row.keys) {
            seen.tags.insert(format!("{}.{key}={value}", case.name()));
        }
        if case.team {
            seen.teams.insert(row.team.to_string());
        }
    }
    seen
}

/// Where a case's events are read from.
enum Reader {
    /// Outbox rows after this id.
    Outbox(i64),
    /// This connection's own replication slot, consumed by
    /// `pg_logical_slot_get_binary_changes` and assembled as capture does.
    Wal { slot: String, assembler: Box<Assembler> },
}

impl Reader {
    async fn events_since(&mut self, client: &tokio_postgres::Client, case: &Case, table: &TableConfig) -> Seen {
        match self {
            Reader::Outbox(after) => events_since(client, case, table, after).await,
            Reader::Wal { slot, assembler } => wal_events(client, case, slot, assembler).await,
        }
    }
}

/// Events of `case`'s table in the changes of `slot` not read yet.
async fn wal_events(client: &tokio_postgres::Client, case: &Case, slot: &str, assembler: &mut Assembler) -> Seen {
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, 'proto_version', '1', \
             'publication_names', 'herald', 'messages', 'true')",
            &[&slot],
        )
        .await
        .unwrap();
    let mut seen = Seen::default();
    for row in rows {
        let data: Vec<u8> = row.get(0);
        let events = match frame(bytes::Bytes::from(data)).unwrap() {
            WalMessage::Begin { final_lsn, xid, commit_time_us } => {
                assembler.begin(final_lsn, xid, commit_time_us);
                continue;
            }
            WalMessage::Change(data) => {
                assembler.change(&data).unwrap_or_else(|e| panic!("{case:?}: {e}"));
                continue;
            }
            WalMessage::Message { prefix, content, .. } => {
                assembler.message(&prefix, &content).unwrap_or_else(|e| panic!("{case:?}: {e}"));
                continue;
            }
            WalMessage::KeepAlive { .. } => continue,
            WalMessage::Commit { .. } => assembler.commit(1),
        };
        assert!(events.set_aside.is_empty(), "{case:?}: {:?}", events.set_aside);
        for event in events.events.into_iter().filter(|e| e.table == case.name()) {
            let op = match event.operation() {
                Operation::Insert => "I",
                Operation::Update => "U",
                Operation::Delete => "D",
                _ => "T",
            };
            seen.ops.insert(op.into());
            seen.ids.entry(event.tenant.clone()).or_default().extend(event.ids);
            seen.tags.extend(event.tags);
            seen.teams.extend(event.teams);
            seen.all_tenants |= event.all_tenants;
        }
    }
    seen
}

/// Events of the outbox rows `case`'s table wrote after outbox id `after`.
async fn events_since(client: &tokio_postgres::Client, case: &Case, table: &TableConfig, after: &mut i64) -> Seen {
    let rows = client
        .query(
            "SELECT id, op, rows FROM herald.outbox WHERE table_name = $1 AND id > $2 ORDER BY id",
            &[&case.name(), &*after],
        )
        .await
        .unwrap();
    let mut seen = Seen::default();
    for row in rows {
        let (id, op, images): (i64, String, Vec<Option<String>>) = (row.get(0), row.get(1), row.get(2));
        *after = id;
        let event_id = format!("db:{id}");
        let outbox = OutboxRow {
            event_id: &event_id,
            op: &op,
            rows: &images,
            txid: 1,
            commit_lsn: 1,
            commit_time_us: 1,
            captured_time_us: 1,
            traceparent: "",
        };
        let parsed = events_of(table, &outbox, 2).unwrap_or_else(|e| panic!("{case:?}: outbox row {id}: {e}"));
        assert!(parsed.set_aside.is_empty(), "{case:?}: outbox row {id}: {}", parsed.reason);
        for event in parsed.events {
            seen.ops.insert(op.clone());
            seen.ids.entry(event.tenant.clone()).or_default().extend(event.ids);
            seen.tags.extend(event.tags);
            seen.teams.extend(event.teams);
            seen.all_tenants |= event.all_tenants;
        }
    }
    seen
}

/// Runs the statements of one case, checking the events of each.
async fn run_case(client: &tokio_postgres::Client, case: &Case, reader: &mut Reader) {
    let n = case.names();
    let table = case.config();
    let target = case.target();
    let (id, watched, unwatched, key0) = (q(case.id()), q(n.watched), q(n.unwatched), q(n.keys[0]));
    let mut rows: Vec<Row> = [(1, "acme", 7), (2, "acme", 7), (3, "beta", 8)]
        .into_iter()
        .map(|(id, tenant, team)| Row { id, tenant, team, keys: [format!("s{id}"), format!("c{id}")] })
        .collect();
    let exec = |sql: String| async move {
        client.batch_execute(&sql).await.unwrap_or_else(|e| {
            let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
            panic!("{case:?}: {sql}: {detail}")
        })
    };

    // A multi-row INSERT.
    let values: Vec<String> = rows
        .iter()
        .map(|r| format!("({}, '{}', {}, '{}', '{}', '\"A\"', 'a')", r.id, r.tenant, r.team, r.keys[0], r.keys[1]))
        .collect();
    exec(format!(
        "INSERT INTO {target} ({id}, {}, {}, {key0}, {}, {watched}, {unwatched}) VALUES {}",
        q(n.tenant),
        q(n.team),
        q(n.keys[1]),
        values.join(", ")
    ))
    .await;
    let all: Vec<&Row> = rows.iter().collect();
    assert_eq!(reader.events_since(client, case, &table).await, expected(case, "I", &all), "{case:?}: insert");

    // An update of a watched column.
    exec(format!("UPDATE {target} SET {watched} = '\"B\"' WHERE {id} = 1")).await;
    let one = [&rows[0], &rows[0]];
    assert_eq!(reader.events_since(client, case, &table).await, expected(case, "U", &one), "{case:?}: watched");

    // An update that changes nothing.
    exec(format!("UPDATE {target} SET {watched} = {watched}, {unwatched} = {unwatched}")).await;
    assert_eq!(reader.events_since(client, case, &table).await, Seen::default(), "{case:?}: no-op update");

    // An update of an unwatched column: it matters only when every column does.
    exec(format!("UPDATE {target} SET {unwatched} = 'b'")).await;
    let images: Vec<&Row> = if case.watch { vec![] } else { rows.iter().collect() };
    assert_eq!(reader.events_since(client, case, &table).await, expected(case, "U", &images), "{case:?}: unwatched");

    // A key change tags the old and the new value; without key columns the
    // row's id changes instead.
    let before = rows[1].clone();
    if case.keys > 0 {
        exec(format!("UPDATE {target} SET {key0} = 's2b' WHERE {id} = 2")).await;
        rows[1].keys[0] = "s2b".into();
    } else {
        exec(format!("UPDATE {target} SET {id} = 20 WHERE {id} = 2")).await;
        rows[1].id = 20;
    }
    let pair = [&before, &rows[1]];
    assert_eq!(reader.events_since(client, case, &table).await, expected(case, "U", &pair), "{case:?}: key change");

    // A multi-row update of the watched column.
    exec(format!("UPDATE {target} SET {watched} = '\"C\"'")).await;
    let all: Vec<&Row> = rows.iter().collect();
    assert_eq!(reader.events_since(client, case, &table).await, expected(case, "U", &all), "{case:?}: multi-row");

    exec(format!("DELETE FROM {target} WHERE {id} = 3")).await;
    let gone = [&rows[2]];
    assert_eq!(reader.events_since(client, case, &table).await, expected(case, "D", &gone), "{case:?}: delete");

    exec(format!("TRUNCATE {target}")).await;
    let truncate = Seen {
        ops: ["T".to_string()].into(),
        ids: [(String::new(), BTreeSet::new())].into(),
        tags: [case.name()].into(),
        teams: BTreeSet::new(),
        all_tenants: case.tenant,
    };
    assert_eq!(reader.events_since(client, case, &table).await, truncate, "{case:?}: truncate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_option_combination_captures_every_statement() {
    every_combination(Source::Outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_option_combination_captures_every_statement_from_the_wal() {
    every_combination(Source::Wal).await;
}

async fn every_combination(source: Source) {
    let cases = cases();
    let mut sb = Sandbox::start_source(source, |c| c.capture.chunk_rows = 2).await;
    let client = connect(&sb).await;
    let mut ddl = String::new();
    for schema in [Style::Plain, Style::Colliding, Style::Mixed].map(|s| names(s).schema) {
        ddl.push_str(&format!("CREATE SCHEMA {};\n", q(schema)));
    }
    for case in &cases {
        ddl.push_str(&case.create_sql());
        ddl.push_str(";\n");
    }
    client.batch_execute(&ddl).await.unwrap();
    sb.config.tables = cases.iter().map(Case::config).collect();
    let mut installer = connect(&sb).await;
    let report = herald_capture::install::install(&mut installer, &sb.config).await.expect("install");
    assert_eq!(report.tables.len(), cases.len());
    // Four connections share the cases: the statements wait on round trips.
    // With the WAL each has a slot of its own, made after the install.
    let mut clients = Vec::new();
    for n in 0..4 {
        let client = connect(&sb).await;
        let reader = match source {
            Source::Outbox => Reader::Outbox(0),
            Source::Wal => {
                let slot = format!("{}_{n}", sb.config.capture.slot);
                client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.unwrap();
                Reader::Wal { slot, assembler: Box::new(Assembler::new(&sb.config.tables, "db", 2, 100_000)) }
            }
        };
        clients.push((client, reader));
    }
    let chunk = cases.len().div_ceil(clients.len());
    futures::future::join_all(clients.iter_mut().zip(cases.chunks(chunk)).map(
        |((client, reader), cases)| async move {
            for case in cases {
                run_case(client, case, reader).await;
            }
        },
    ))
    .await;
    drop(clients);
    sb.cleanup().await;
}

async fn connect(sb: &Sandbox) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&sb.config.postgres.url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}
