//! A row image capture cannot turn into an event (a tenant that is not a
//! valid tenant id, a NULL tenant on a tenant table) is set aside alone,
//! kept with the reason; every other image of the statement is applied.

use herald_tests::{Sandbox, assert_eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_tenant_image_does_not_cost_the_valid_tenants_their_invalidation() {
    let sb = Sandbox::start().await;
    let _capture = sb.spawn_capture().await;
    let _broadcast = sb.spawn_broadcast().await;
    let l1 = sb.l1().await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (1, 'acme', 'alice', 'A')").await;
    sb.sql("INSERT INTO res_users (id, tenant_id, website_slug, name) VALUES (2, 'bad tenant!', 'x', 'X')").await;
    assert_eventually!(10, async { l1.cache.applied().events >= 1 }, "insert not applied");
    assert_eventually!(10, async { sb.scalar_i64("SELECT count(*) FROM herald.dead_letter").await == 1 }, "insert");

    assert!(l1.put("acme", "user:1", "A", &["res_users.id=1"]));
    sb.sql("UPDATE res_users SET name = 'B' WHERE id IN (1, 2)").await;
    assert_eventually!(10, async { !l1.has("user:1") }, "acme kept its stale entry");

    assert_eventually!(
        10,
        async { sb.scalar_i64("SELECT count(*) FROM herald.dead_letter").await == 2 },
        "the bad images were not set aside"
    );
    let client = sb.pool.get().await.unwrap();
    let row = client.query_one("SELECT op, rows, reason FROM herald.dead_letter WHERE op = 'U'", &[]).await.unwrap();
    let (op, rows, reason): (String, Vec<Option<String>>, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(op, "U");
    // The old and the new image of row 2, and nothing of acme's row.
    let images: Vec<&[Option<String>]> = rows.chunks(5).collect();
    assert_eq!(images.len(), 2, "{rows:?}");
    for image in images {
        assert_eq!(image[0].as_deref(), Some("bad tenant!"));
        assert_eq!(image[1].as_deref(), Some("2"));
    }
    assert!(reason.contains("tenant"), "{reason}");
    assert_eq!(sb.scalar_i64("SELECT count(*) FROM herald.outbox").await, 0, "nothing is left behind");
    sb.cleanup().await;
}
