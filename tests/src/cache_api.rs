//! Test support for the cache API: the demo resources and tokens, in-process
//! nodes on `127.0.0.1:0`, a gRPC client with a bearer token, and a small
//! HTTP client over a real socket.

use std::net::SocketAddr;

use herald_cache_api::{Listeners, Options};
use herald_core::config::{Config, ResourceConfig, Shape, TokenConfig};
use herald_proto::v1::cache_client::CacheClient;
use herald_proto::v1::{GetRequest, GetResponse, ResourceRef, get_request};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{Sandbox, assert_eventually, http_get, metric};

pub const ACME_TOKEN: &str = "acme-token-0123456789";
pub const GLOBEX_TOKEN: &str = "globex-token-0123456789";
pub const BACKEND_TOKEN: &str = "backend-token-0123456789";

/// A resource with the suite's lifetimes (60 s, negative entries too).
pub fn resource(name: &str, sql: &str, params: &[&str], shape: Shape, tags: &[&str]) -> ResourceConfig {
    ResourceConfig {
        name: name.into(),
        sql: sql.into(),
        params: params.iter().map(|s| s.to_string()).collect(),
        shape,
        tags: tags.iter().map(|s| s.to_string()).collect(),
        ttl_ms: 60_000,
        unlimited_ttl_reason: None,
        negative_ttl_ms: 60_000,
        ttl_jitter_pct: 10,
        global: false,
        allow_secret_columns: Vec::new(),
        max_staleness_ms: None,
        on_stale: Default::default(),
    }
}

/// The demo resources over `res_users`, and three tokens: one per tenant
/// (`acme`, `globex`) and a trusted backend's.
pub fn configure(config: &mut Config) {
    let token = |name: &str, secret: &str, tenants: &[&str]| TokenConfig {
        name: name.into(),
        token: Some(secret.into()),
        token_env: None,
        tenants: tenants.iter().map(|s| s.to_string()).collect(),
    };
    config.cache.tokens = vec![
        token("acme-app", ACME_TOKEN, &["acme"]),
        token("globex-app", GLOBEX_TOKEN, &["globex"]),
        token("backend", BACKEND_TOKEN, &["*"]),
    ];
    config.cache.ops_addr = "127.0.0.1:0".into();
    config.cache.max_value_bytes = 64 * 1024;
    config.cache.resources = vec![
        resource(
            "user_by_slug",
            "SELECT id, website_slug, name FROM res_users WHERE tenant_id = $tenant AND website_slug = $1",
            &["slug"],
            Shape::Row,
            &["res_users.website_slug=$1", "res_users.id={id}"],
        ),
        resource(
            "user_by_id",
            "SELECT id, website_slug, name FROM res_users WHERE tenant_id = $tenant AND id = $1",
            &["id"],
            Shape::Row,
            &["res_users.id=$1"],
        ),
        // Counts its own database reads in a sequence (nextval is not rolled
        // back and runs once per read of the row).
        resource(
            "user_probe",
            "SELECT id, name, nextval('herald_reads') AS reads FROM res_users WHERE tenant_id = $tenant AND id = $1",
            &["id"],
            Shape::Row,
            &["res_users.id=$1"],
        ),
        resource(
            "team_members",
            "SELECT id, name FROM res_users WHERE tenant_id = $tenant AND team_id = $1 ORDER BY id",
            &["team"],
            Shape::Rows,
            &["res_users"],
        ),
        resource(
            "user_count",
            "SELECT count(*) FROM res_users WHERE tenant_id = $tenant",
            &[],
            Shape::Scalar,
            &["res_users"],
        ),
    ];
}

/// A sandbox with the demo resources (and the read-counting sequence).
pub async fn sandbox() -> Sandbox {
    sandbox_with(|_| {}).await
}

/// Like [`sandbox`], letting the test adjust the config after the defaults.
pub async fn sandbox_with(adjust: impl FnOnce(&mut Config)) -> Sandbox {
    let sb = Sandbox::start_with(|c| {
        configure(c);
        adjust(c);
    })
    .await;
    sb.sql("CREATE SEQUENCE herald_reads").await;
    sb
}

/// A cache-api node running in-process.
pub struct CacheNode {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub ops_addr: SocketAddr,
    token: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Sandbox {
    /// Starts a cache-api node and waits until it serves with a live L1.
    pub async fn spawn_cache_api(&self, options: Options) -> CacheNode {
        let node = self.spawn_cache_api_unchecked(options).await;
        assert_eventually!(10, async { node.readyz().await.contains("l1: ok") }, "cache-api L1 never became live");
        assert_eventually!(10, async { node.readyz().await.contains("redis: ok") }, "cache-api never saw redis");
        node
    }

    /// Starts a cache-api node without waiting for it.
    pub async fn spawn_cache_api_unchecked(&self, options: Options) -> CacheNode {
        self.start_cache_api(self.config.clone(), options).await
    }

    /// Starts a cache-api node with `config`.
    pub async fn start_cache_api(&self, config: Config, options: Options) -> CacheNode {
        let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind") };
        let listeners = Listeners { grpc: bind().await, http: bind().await, ops: bind().await };
        let grpc_addr = listeners.grpc.local_addr().expect("addr");
        let http_addr = listeners.http.local_addr().expect("addr");
        let ops_addr = listeners.ops.local_addr().expect("addr");
        let token = self.shutdown.child_token();
        let task = tokio::spawn(herald_cache_api::run(config, listeners, options, token.clone()));
        CacheNode { grpc_addr, http_addr, ops_addr, token, task }
    }
}

impl CacheNode {
    pub async fn readyz(&self) -> String {
        http_get(self.ops_addr, "/readyz").await
    }

    /// Sum of every sample of metric `name` whose labels contain `labels`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        metric(self.ops_addr, name, labels).await
    }

    pub async fn client(&self) -> CacheClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc_addr)).expect("uri").connect().await;
        CacheClient::new(channel.expect("connect grpc"))
    }

    /// `Get` of a resource with `token`.
    pub async fn get(
        &self,
        token: &str,
        tenant: &str,
        resource: &str,
        params: &[&str],
    ) -> Result<GetResponse, tonic::Status> {
        self.get_at(token, tenant, resource, params, 0).await
    }

    /// `Get` of a resource with `token` and a read-your-writes position.
    pub async fn get_at(
        &self,
        token: &str,
        tenant: &str,
        resource: &str,
        params: &[&str],
        min_commit_lsn: u64,
    ) -> Result<GetResponse, tonic::Status> {
        let request = GetRequest {
            tenant: tenant.into(),
            target: Some(get_request::Target::Resource(ResourceRef {
                resource: resource.into(),
                params: params.iter().map(|s| s.to_string()).collect(),
            })),
            min_commit_lsn,
        };
        self.client().await.get(authed(request, token)).await.map(|r| r.into_inner())
    }

    /// An HTTP request with a bearer token: (status, headers, body).
    pub async fn http(&self, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> HttpResponse {
        http_request(self.http_addr, method, path, token, body).await
    }

    /// Kills the node where it stands.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Graceful shutdown; returns what `run` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.task.await?
    }

    /// Waits for `run` to end by itself (a start-up error).
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// `message` with `authorization: Bearer <token>`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
    request
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect http");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("http head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status");
    let headers =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    HttpResponse { status, headers, body: raw[split + 4..].to_vec() }
}

/// A keep-alive HTTP/1.1 connection: one request at a time, responses read
/// by `Content-Length` (what the cache API's HTTP server sends).
pub struct HttpConn {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self { stream: tokio::io::BufReader::new(stream) })
    }

    /// Sends a body-less request and returns (status, body).
    pub async fn get(&mut self, path: &str, token: &str) -> std::io::Result<(u16, Vec<u8>)> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let head = format!("GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\r\n");
        self.stream.get_mut().write_all(head.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("status line"))?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(bad("connection closed"));
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().map_err(|_| bad("content-length"))?;
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}
