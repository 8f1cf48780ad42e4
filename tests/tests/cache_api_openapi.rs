//! The cache API's OpenAPI document against the running server: it lists
//! each configured resource with its parameters, states the limits the
//! server enforces, and schemathesis (PyPI, set up by
//! `scripts/setup-python.sh`) finds no response outside it.

use std::path::PathBuf;
use std::process::Stdio;

use herald_cache_api::Options;
use herald_tests::cache_api::{ACME_TOKEN, sandbox};
use herald_tests::unique;

/// The schemathesis binary: `HERALD_SCHEMATHESIS`, or the repository's venv.
fn schemathesis() -> PathBuf {
    match std::env::var_os("HERALD_SCHEMATHESIS") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/schemathesis"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_lists_each_resource_with_its_named_parameters() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let r = node.http("GET", "/openapi.json", None, b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let doc = r.json();
    let paths = doc["paths"].as_object().expect("paths");
    for (resource, param) in [("user_by_slug", "slug"), ("user_by_id", "id"), ("team_members", "team")] {
        let get = &paths[&format!("/v1/t/{{tenant}}/r/{resource}")]["get"];
        let params = get["parameters"].as_array().expect("parameters");
        let named = params.iter().find(|p| p["name"] == param).unwrap_or_else(|| panic!("{resource}: {param}"));
        assert_eq!((named["in"].as_str(), named["required"].as_bool()), (Some("query"), Some(true)), "{resource}");
    }
    assert!(paths.contains_key("/v1/t/{tenant}/r/user_count"));
    let put = &paths["/v1/t/{tenant}/k/{key}"]["put"];
    assert_eq!(put["requestBody"]["content"]["application/octet-stream"]["schema"]["maxLength"], 64 * 1024);
    assert_eq!(doc["components"]["schemas"]["Tag"]["maxLength"], 256);

    // The documented call works as documented.
    sb.sql("INSERT INTO res_users (tenant_id, website_slug, name, team_id) VALUES ('acme', 'alice', 'Alice', 1)").await;
    let r = node.http("GET", "/v1/t/acme/r/user_by_slug?slug=alice", Some(ACME_TOKEN), b"").await;
    assert_eq!((r.status, r.json()["value"]["name"].as_str()), (200, Some("Alice")));
    node.stop().await.expect("stop");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_too_large_is_413_with_an_error_body_everywhere() {
    let sb = sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let limit = 64 * 1024;
    // Just over cache.max_value_bytes, and past the transport's body limit.
    for (method, path, size) in [
        ("PUT", "/v1/t/acme/k/big", limit + 1),
        ("PUT", "/v1/t/acme/k/big", limit + 65 * 1024),
        ("POST", "/v1/t/acme/get", limit + 65 * 1024),
        ("POST", "/v1/t/acme/invalidate", limit + 65 * 1024),
    ] {
        let r = node.http(method, path, Some(ACME_TOKEN), &vec![b'x'; size]).await;
        assert_eq!(r.status, 413, "{method} {path} {size}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "too_large", "{method} {path} {size}");
    }
    // axum's own refusals come in the documented error form too.
    let r = node.http("GET", "/v1/t/acme/k/%FF", Some(ACME_TOKEN), b"").await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("invalid_argument")));
    let r = node.http("GET", "/v1/nowhere", Some(ACME_TOKEN), b"").await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (404, Some("not_found")));
    // The node keeps serving.
    let r = node.http("PUT", "/v1/t/acme/k/small", Some(ACME_TOKEN), b"ok").await;
    assert_eq!(r.status, 200, "{}", r.text());
    node.stop().await.expect("stop");
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure() {
    let bin = schemathesis();
    if !bin.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: run scripts/setup-python.sh (or set HERALD_SCHEMATHESIS)",
            bin.display()
        );
        eprintln!("skipped: {} is missing; run scripts/setup-python.sh", bin.display());
        return;
    }
    let sb = sandbox().await;
    sb.sql(
        "INSERT INTO res_users (tenant_id, website_slug, name, team_id) VALUES ('acme', 'alice', 'Alice', 1), ('acme', 'bob', 'Bob', 1)",
    )
    .await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let dir = std::env::temp_dir().join(unique("schemathesis"));
    std::fs::create_dir_all(&dir).expect("report dir");
    // Every request names tenant acme, so the acme token reaches the handlers.
    let config = dir.join("schemathesis.toml");
    std::fs::write(&config, "[parameters]\n\"path.tenant\" = \"acme\"\n").expect("config");
    // A fixed seed and a small budget by default (about 15 s); both can be
    // raised for a deeper run.
    let seed = std::env::var("HERALD_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let examples = std::env::var("HERALD_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "20".into());
    let output = tokio::process::Command::new(&bin)
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("http://{}/openapi.json", node.http_addr)])
        .args(["--header", &format!("Authorization: Bearer {ACME_TOKEN}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing", "--max-examples", &examples, "--seed", &seed])
        .args(["--request-timeout", "10", "--workers", "1", "--no-color"])
        .arg("--report-dir")
        .arg(&dir)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run schemathesis");
    let report = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{report}");
    assert!(output.status.success(), "schemathesis found failures (seed {seed}):\n{report}");
    node.stop().await.expect("stop");
    sb.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}
