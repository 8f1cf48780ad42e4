//! The generated triggers must never break a writer's statement, whatever
//! the table's options, and must record what the statement changed.

use herald_core::config::TableConfig;
use herald_tests::{Sandbox, demo_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_on_a_table_without_watch_columns_succeeds() {
    // The README's minimal config: watch_columns left out (every column matters).
    let sb = Sandbox::start_with(|c| {
        c.tables = vec![TableConfig {
            key_columns: vec!["website_slug".into()],
            team_column: None,
            watch_columns: vec![],
            ..demo_table()
        }]
    })
    .await;
    sb.sql("INSERT INTO res_users (tenant_id, website_slug, name) VALUES ('acme', 'alice', 'A')").await;
    sb.sql("UPDATE res_users SET name = 'B'").await;
    assert_eq!(sb.scalar_i64("SELECT count(*) FROM herald.outbox WHERE op = 'U'").await, 1);
    sb.cleanup().await;
}
