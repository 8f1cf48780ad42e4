//! What a newcomer meets in the first hour (issue 11): gRPC reflection any
//! generic client can read (v1 and v1alpha) on both gRPC ports, commands that
//! say which servers they talk to and fail or warn instead of silently
//! talking to the wrong ones, a client token from the command line, and
//! error messages and logs that read well outside a terminal.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use herald_cache_api::Options;
use herald_core::config::Config;
use herald_tests::cache_api::sandbox as cache_sandbox;
use herald_tests::gateway::{HS_SECRET, SERVICE_TOKEN, WsClient, configure as configure_gateway, http_publish};
use herald_tests::process::binary;
use herald_tests::{Sandbox, unique};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use tonic::transport::Channel;

/// Services listed by the reflection service at `addr`, asked in protocol
/// version v1 and in v1alpha (what Python's grpcio-reflection speaks).
async fn listed_services(addr: std::net::SocketAddr) -> (Vec<String>, Vec<String>) {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("grpc connect");
    let v1 = {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = ServerReflectionClient::new(channel.clone());
        let mut responses =
            client.server_reflection_info(futures::stream::iter([request])).await.expect("v1 reflection").into_inner();
        match responses.message().await.expect("v1 reply").expect("a v1 reply").message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
            other => panic!("v1: no service list: {other:?}"),
        }
    };
    let v1alpha = {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = ServerReflectionClient::new(channel);
        let mut responses = client
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("v1alpha reflection")
            .into_inner();
        match responses.message().await.expect("v1alpha reply").expect("a v1alpha reply").message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
            other => panic!("v1alpha: no service list: {other:?}"),
        }
    };
    (sorted(v1), sorted(v1alpha))
}

/// Whether the v1 reflection service at `addr` can describe `symbol`.
async fn describes(addr: std::net::SocketAddr, symbol: &str) -> bool {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("grpc connect");
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut responses = client.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    // An unknown symbol ends the stream with NOT_FOUND (or answers with an error response).
    match responses.message().await {
        Ok(Some(reply)) => matches!(reply.message_response, Some(MessageResponse::FileDescriptorResponse(_))),
        Ok(None) => false,
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
            false
        }
    }
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

async fn health_of(addr: std::net::SocketAddr, service: &str) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("grpc connect");
    let reply = HealthClient::new(channel).check(HealthCheckRequest { service: service.into() }).await;
    reply.expect("health check").into_inner().status
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_api_reflection_speaks_v1_and_v1alpha_and_lists_only_what_it_serves() {
    let sb = cache_sandbox().await;
    let _broadcast = sb.spawn_broadcast().await;
    let node = sb.spawn_cache_api(Options::default()).await;
    let (v1, v1alpha) = listed_services(node.grpc_addr).await;
    let expected = sorted(
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "herald.v1.Cache",
        ]
        .map(String::from)
        .to_vec(),
    );
    assert_eq!(v1, expected);
    assert_eq!(v1alpha, expected);
    assert!(describes(node.grpc_addr, "herald.v1.Cache").await, "herald.v1.Cache not described");
    assert!(describes(node.grpc_addr, "grpc.health.v1.Health").await, "grpc.health.v1.Health not described");
    assert!(!describes(node.grpc_addr, "herald.v1.Publisher").await, "the cache API describes herald.v1.Publisher");
    assert_eq!(health_of(node.grpc_addr, "herald.v1.Cache").await, SERVING);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_grpc_port_serves_health_and_reflection() {
    let sb = Sandbox::start_with(configure_gateway).await;
    let gw = sb.spawn_gateway().await;
    let (v1, v1alpha) = listed_services(gw.grpc).await;
    let expected = sorted(
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "herald.v1.Publisher",
        ]
        .map(String::from)
        .to_vec(),
    );
    assert_eq!(v1, expected);
    assert_eq!(v1alpha, expected);
    assert!(describes(gw.grpc, "herald.v1.Publisher").await, "herald.v1.Publisher not described");
    assert!(!describes(gw.grpc, "herald.v1.Cache").await, "the gateway describes herald.v1.Cache");
    assert_eq!(health_of(gw.grpc, "herald.v1.Publisher").await, SERVING);
    assert_eq!(health_of(gw.grpc, "").await, SERVING);
    sb.cleanup().await;
}

/// `config` as a TOML file for a command; removed by the caller.
fn config_file(config: &Config) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}-{}.toml", config.env, unique("c")));
    std::fs::write(&path, toml::to_string(config).expect("serialize config")).expect("write config");
    path
}

/// A command of a Herald binary with `config` and a clean environment for
/// the variables Herald reads (a developer's shell may export them).
fn herald(binary_name: &str, config: &PathBuf) -> Command {
    let mut command = Command::new(binary(binary_name));
    command.arg("--config").arg(config);
    for (name, _) in std::env::vars() {
        if name.starts_with("HERALD_") || name == "DATABASE_URL" || name == "REDIS_URL" {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null()).kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_status_names_its_servers_and_fails_without_the_schema() {
    let sb = Sandbox::start().await;
    let mut config = sb.config.clone();
    // Trust authentication ignores the password; it must never be printed.
    config.postgres.url = config.postgres.url.replacen("postgres://postgres@", "postgres://postgres:s3cret-pw@", 1);
    assert!(config.postgres.url.contains("s3cret-pw"), "{}", config.postgres.url);
    let path = config_file(&config);

    let ok = herald("herald-capture", &path).arg("status").output().await.expect("run status");
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "status failed on an installed database: {stderr}");
    assert!(stderr.contains(&format!("/{}", sb.db_name)), "no postgres server line: {stderr}");
    assert!(stderr.contains("postgres://postgres:***@"), "password not redacted: {stderr}");
    assert!(stderr.contains(&config.redis.url), "no redis server line: {stderr}");
    assert!(!stderr.contains("s3cret-pw") && !String::from_utf8_lossy(&ok.stdout).contains("s3cret-pw"));

    sb.sql("DROP SCHEMA herald CASCADE").await;
    let missing = herald("herald-capture", &path).arg("status").output().await.expect("run status");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success(), "status exited 0 without the schema: {stderr}");
    assert!(stderr.contains("not installed") && stderr.contains("herald-capture install"), "unclear message: {stderr}");
    assert!(!stderr.contains("s3cret-pw"), "password printed: {stderr}");
    let _ = std::fs::remove_file(path);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_watch_warns_when_no_heartbeat_arrives_and_names_its_server() {
    // No broadcast runs in this namespace: nothing ever publishes a heartbeat.
    let sb = Sandbox::start().await;
    let path = config_file(&sb.config);
    let mut child =
        herald("herald-broadcast", &path).arg("watch").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let warned = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line.clone());
            if line.contains("no heartbeat") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(warned, Ok(true), "no warning; stderr: {seen:?}");
    assert!(seen.iter().any(|l| l.contains(&sb.config.redis.url)), "redis server not named: {seen:?}");
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_file(path);
    sb.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_token_command_mints_a_token_the_gateway_accepts() {
    let sb = Sandbox::start_with(configure_gateway).await;
    let gw = sb.spawn_gateway().await;
    let path = config_file(&sb.config);
    let out = herald("herald-gateway", &path)
        .args(["token", "--tenant", "acme", "--sub", "alice", "--channels", "team:1,alerts:*", "--ttl", "600"])
        .output()
        .await
        .expect("run token");
    assert!(out.status.success(), "token failed: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.kid.as_deref(), Some("hs1"), "signed with the first HS256 key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(HS_SECRET.as_bytes()),
        &validation,
    )
    .expect("verifies with the configured key")
    .claims;
    assert_eq!(claims["channels"], json!(["team:1", "alerts:*"]));
    let ttl = claims["exp"].as_i64().unwrap() - jsonwebtoken::get_current_timestamp() as i64;
    assert!((500..=600).contains(&ttl), "exp is {ttl} s away");

    let mut client = WsClient::connect(&gw, &token).await;
    let reply = client.subscribe("team:1").await;
    assert_eq!(reply["type"], "subscribed", "subscribe refused: {reply}");
    let (status, body) = http_publish(
        &gw,
        Some(SERVICE_TOKEN),
        &json!({"tenant": "acme", "channel": "team:1", "data": {"text": "hello"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let publication = client.next_pub().await;
    assert_eq!(publication["data"]["text"], "hello", "{publication}");
    let denied = client.subscribe("team:2").await;
    assert_eq!(denied["type"], "error", "a channel the token does not name was allowed: {denied}");

    // A tenant the key cannot sign for is refused with a clear message.
    let bad = herald("herald-gateway", &path)
        .args(["token", "--tenant", "not a tenant", "--sub", "alice", "--channels", "team:1"])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tenant"), "{}", String::from_utf8_lossy(&bad.stderr));
    let _ = std::fs::remove_file(path);
    sb.cleanup().await;
}

#[test]
fn an_unknown_environment_override_is_named() {
    let env = [("HERALD_CAPTURE__BATCH_SIZ".to_string(), "5".to_string())].into();
    let err = Config::load("[capture]\nbatch_size = 10\n", &env).unwrap_err().to_string();
    assert!(err.contains("HERALD_CAPTURE__BATCH_SIZ"), "{err}");
    assert!(!err.contains("line"), "points at a line of a document the user never wrote: {err}");
    let env = [("HERALD_CAPTURE__BATCH_SIZE".to_string(), "many".to_string())].into();
    let err = Config::load("", &env).unwrap_err().to_string();
    assert!(err.contains("HERALD_CAPTURE__BATCH_SIZE"), "{err}");
    // A mistake in the file still points at the file's own line.
    let err = Config::load("env = \"dev\"\n\n[capture]\nbatchsize = 3\n", &Default::default()).unwrap_err().to_string();
    assert!(err.contains("line 4") && err.contains("batchsize"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let sb = Sandbox::start().await;
    let path = config_file(&sb.config);
    let mut child = herald("herald-capture", &path)
        .arg("run")
        .env("HERALD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let started = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line.clone());
            if line.contains("INFO") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(started, Ok(true), "no info line: {seen:?}");
    assert!(seen.iter().all(|l| !l.contains('\u{1b}')), "ANSI escape codes in a log file: {seen:?}");
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_file(path);
    sb.cleanup().await;
}
