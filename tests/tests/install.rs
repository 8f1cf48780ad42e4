//! `install`: idempotent, safe to run from several instances at once,
//! and a bad configuration fails with a message that names the key.

use herald_core::config::TableConfig;
use herald_tests::{Sandbox, demo_table};
use tokio_postgres::NoTls;

async fn connect(sb: &Sandbox) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&sb.config.postgres.url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_and_concurrent_installs_serialise() {
    let sb = Sandbox::start().await;
    let mut installs = Vec::new();
    for _ in 0..4 {
        let (config, mut client) = (sb.config.clone(), connect(&sb).await);
        installs.push(tokio::spawn(async move { herald_capture::install::install(&mut client, &config).await }));
    }
    for install in installs {
        install.await.unwrap().expect("concurrent install");
    }
    let triggers = sb
        .scalar_i64(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'res_users'::regclass AND tgname LIKE 'herald_capture_%'",
        )
        .await;
    assert_eq!(triggers, 4, "insert, update, delete and truncate triggers, once each");
    assert_eq!(sb.scalar_i64("SELECT value::int8 FROM herald.meta WHERE key = 'schema_version'").await, 1);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_name_the_key() {
    let sb = Sandbox::start().await;
    let mut client = connect(&sb).await;
    let mut config = sb.config.clone();
    config.tables = vec![TableConfig { key_columns: vec!["no_such_column".into()], ..demo_table() }];
    let err = herald_capture::install::install(&mut client, &config).await.unwrap_err().to_string();
    assert!(err.contains("tables[0] (res_users).key_columns") && err.contains("no_such_column"), "{err}");

    config.tables = vec![TableConfig { name: "ghost".into(), ..demo_table() }];
    let err = herald_capture::install::install(&mut client, &config).await.unwrap_err().to_string();
    assert!(err.contains("tables[0] (ghost)") && err.contains("does not exist"), "{err}");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_removed_from_config_loses_its_triggers() {
    let sb = Sandbox::start().await;
    let mut client = connect(&sb).await;
    let mut config = sb.config.clone();
    config.tables.clear();
    let report = herald_capture::install::install(&mut client, &config).await.unwrap();
    assert_eq!(report.removed_triggers.len(), 4, "{:?}", report.removed_triggers);
    assert_eq!(report.removed_functions.len(), 4, "{:?}", report.removed_functions);
    let functions = sb.scalar_i64("SELECT count(*) FROM pg_proc WHERE pronamespace = 'herald'::regnamespace").await;
    assert_eq!(functions, 1, "only herald.ring() is left");
    sb.sql("INSERT INTO res_users (tenant_id) VALUES ('acme')").await;
    assert_eq!(sb.scalar_i64("SELECT count(*) FROM herald.outbox").await, 0);
    sb.cleanup().await;
}

/// A role that may only create objects in a schema it owns names a trigger
/// so that an unquoted `DROP TRIGGER` would run its SQL as the installer
/// (the name fits Postgres's 63 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_trigger_name_cannot_inject_sql_into_install() {
    let sb = Sandbox::start().await;
    // Roles are cluster-wide: a name of its own, dropped at the end.
    let role = herald_tests::unique("herald_mallory_");
    sb.sql(&format!("CREATE ROLE {role} LOGIN; CREATE SCHEMA {role} AUTHORIZATION {role}")).await;
    let mut url: tokio_postgres::Config = sb.config.postgres.url.parse().unwrap();
    url.user(&role);
    let (mallory, connection) = url.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    let planted = mallory
        .batch_execute(&format!(
            r#"CREATE TABLE {role}.t1 (id int);
               CREATE FUNCTION {role}.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;
               CREATE TRIGGER "herald_capture_"" ON pg_class; CREATE TABLE public.pwned(); --"
                   AFTER INSERT ON {role}.t1 FOR EACH STATEMENT EXECUTE FUNCTION {role}.noop();"#
        ))
        .await;
    drop(mallory);

    let install = if planted.is_ok() {
        let mut client = connect(&sb).await;
        Some(herald_capture::install::install(&mut client, &sb.config).await.map_err(|e| format!("{e:?}")))
    } else {
        None
    };
    let pwned = sb.scalar_i64("SELECT (to_regclass('public.pwned') IS NOT NULL)::int::int8").await;
    let kept = sb.scalar_i64(&format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{role}.t1'::regclass")).await;
    sb.sql(&format!("DROP SCHEMA {role} CASCADE; DROP TABLE IF EXISTS public.pwned")).await;
    sb.cleanup().await;
    let (admin, connection) = tokio_postgres::connect(&herald_tests::admin_url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    admin.batch_execute(&format!("DROP ROLE {role}")).await.unwrap();

    planted.expect("mallory plants the trigger");
    install.unwrap().expect("install succeeds");
    assert_eq!(pwned, 0, "install ran SQL taken from a trigger name");
    assert_eq!(kept, 1, "a trigger whose function is not Herald's is not Herald's to drop");
}

/// Postgres truncates identifiers to 63 bytes: a long table name must still
/// get four distinct trigger functions, and two names sharing a long prefix
/// must not share functions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_table_names_get_their_own_trigger_functions() {
    let sb = Sandbox::start().await;
    let long = "a".repeat(54);
    let longer = format!("{}b", "a".repeat(62));
    let sibling = format!("{}c", "a".repeat(62));
    let mut config = sb.config.clone();
    for name in [&long, &longer, &sibling] {
        sb.sql(&format!("CREATE TABLE {name} (id bigint PRIMARY KEY, tenant_id text)")).await;
        config.tables.push(TableConfig {
            name: name.clone(),
            key_columns: vec![],
            team_column: None,
            watch_columns: vec![],
            ..demo_table()
        });
    }
    let mut client = connect(&sb).await;
    herald_capture::install::install(&mut client, &config).await.expect("install");
    let functions = sb.scalar_i64("SELECT count(*) FROM pg_proc WHERE pronamespace = 'herald'::regnamespace").await;
    // ring() plus four per table (the demo table and the three long ones).
    assert_eq!(functions, 1 + 4 * 4, "each table has its own four functions");
    for name in [&long, &longer, &sibling] {
        sb.sql(&format!("INSERT INTO {name} VALUES (1, 'acme')")).await;
        let ops = sb
            .scalar_i64(&format!("SELECT count(*) FROM herald.outbox WHERE table_name = '{name}' AND op = 'I'"))
            .await;
        assert_eq!(ops, 1, "an insert into {name} writes op I under its own name");
    }
    sb.cleanup().await;
}

/// The sweep quotes what it reads from the catalog: a watched table whose
/// name holds a quote and a space loses its triggers cleanly when it leaves
/// the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_quotes_catalog_names() {
    let sb = Sandbox::start().await;
    sb.sql(
        r#"CREATE SCHEMA "odd ""schema"""; CREATE TABLE "odd ""schema"""."Res""Users; x" (id bigint, tenant_id text)"#,
    )
    .await;
    let mut config = sb.config.clone();
    config.tables.push(TableConfig {
        name: "odd".into(),
        schema: "odd \"schema\"".into(),
        table: Some("Res\"Users; x".into()),
        key_columns: vec![],
        team_column: None,
        watch_columns: vec![],
        ..demo_table()
    });
    let mut client = connect(&sb).await;
    herald_capture::install::install(&mut client, &config).await.expect("install");
    config.tables.pop();
    let report = herald_capture::install::install(&mut client, &config).await.expect("install without it");
    assert_eq!(report.removed_triggers.len(), 4, "{:?}", report.removed_triggers);
    let left = sb
        .scalar_i64(r#"SELECT count(*) FROM pg_trigger WHERE tgrelid = '"odd ""schema"""."Res""Users; x"'::regclass"#)
        .await;
    assert_eq!(left, 0);
    sb.cleanup().await;
}
