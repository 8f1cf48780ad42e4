//! Gateway test support: a gateway running in-process on `127.0.0.1:0`
//! listeners, token minting (HS256 and RS256 test keys), a real WebSocket
//! client, and the publish API over real HTTP and gRPC.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use herald_core::config::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::Sandbox;

/// The HS256 key `hs1` of every test gateway.
pub const HS_SECRET: &str = "test-secret-0123456789abcdefghijkl";
/// A second HS256 key, `hs2` (rotation: both are accepted).
pub const HS_SECRET_2: &str = "test-secret-rotated-0123456789abcdef";
/// A secret no gateway knows.
pub const WRONG_SECRET: &str = "wrong-secret-0123456789abcdefghijkl";
/// The RS256 key `rs1`.
pub const RSA_PRIVATE: &str = include_str!("testdata/test-rsa-private.pem");
pub const RSA_PUBLIC: &str = include_str!("testdata/test-rsa-public.pem");
/// A service token that may publish to tenants `acme` and `globex`.
pub const SERVICE_TOKEN: &str = "test-service-token-0123456789";
/// A service token that may publish to `acme` only.
pub const ACME_SERVICE_TOKEN: &str = "test-acme-only-token-0123456789";

/// Adds the test keys, service tokens and namespaces to `config`, with
/// test-friendly timings.
pub fn configure(config: &mut Config) {
    let text = format!(
        r#"
        [gateway]
        ops_addr = "127.0.0.1:0"
        listen_addr = "127.0.0.1:0"
        grpc_addr = "127.0.0.1:0"
        presence_ttl_ms = 3000
        shutdown_grace_ms = 3000
        reconnect_jitter_ms = 2000
        [[gateway.jwt_keys]]
        kid = "hs1"
        hs256_secret = "{HS_SECRET}"
        [[gateway.jwt_keys]]
        kid = "hs2"
        hs256_secret = "{HS_SECRET_2}"
        [[gateway.jwt_keys]]
        kid = "rs1"
        rs256_public_pem = """{RSA_PUBLIC}"""
        [[gateway.service_tokens]]
        name = "test-app"
        token = "{SERVICE_TOKEN}"
        tenants = ["acme", "globex"]
        [[gateway.service_tokens]]
        name = "acme-app"
        token = "{ACME_SERVICE_TOKEN}"
        tenants = ["acme"]
        [[gateway.namespaces]]
        name = "team"
        history_size = 100
        history_ttl_s = 300
        presence = true
        [[gateway.namespaces]]
        name = "alerts"
        history_size = 0
        presence = false
        "#
    );
    let parsed = Config::load(&text, &Default::default()).expect("test gateway config");
    config.gateway = parsed.gateway;
}

/// A signed token. `exp_in_s` may be negative (expired).
pub fn mint(kid: &str, tenant: &str, subject: &str, channels: Value, exp_in_s: i64) -> String {
    let claims = json!({
        "tenant": tenant,
        "sub": subject,
        "channels": channels,
        "exp": jsonwebtoken::get_current_timestamp() as i64 + exp_in_s,
    });
    let (alg, key) = match kid {
        "rs1" => (Algorithm::RS256, EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("test rsa key")),
        "hs2" => (Algorithm::HS256, EncodingKey::from_secret(HS_SECRET_2.as_bytes())),
        "wrong" => (Algorithm::HS256, EncodingKey::from_secret(WRONG_SECRET.as_bytes())),
        _ => (Algorithm::HS256, EncodingKey::from_secret(HS_SECRET.as_bytes())),
    };
    let mut header = Header::new(alg);
    header.kid = Some(if kid == "wrong" { "hs1".into() } else { kid.into() });
    jsonwebtoken::encode(&header, &claims, &key).expect("encode token")
}

/// A valid token of `tenant` allowing every `team` channel.
pub fn team_token(tenant: &str, subject: &str) -> String {
    mint("hs1", tenant, subject, json!(["team:*", "alerts:*"]), 3600)
}

/// A gateway running in-process.
pub struct GatewayHandle {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub ops: SocketAddr,
    token: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl GatewayHandle {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.http)
    }

    /// Graceful shutdown; returns when the gateway has returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.task.await?
    }

    /// The `/readyz` response.
    pub async fn readyz(&self) -> String {
        crate::http_get(self.ops, "/readyz").await
    }

    /// The value of metric `name` (summed over its label sets).
    pub async fn metric(&self, name: &str) -> f64 {
        let body = crate::http_get(self.ops, "/metrics").await;
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Sandbox {
    /// Starts a gateway in-process with the sandbox's config (call
    /// [`configure`] in `start_with` first).
    pub async fn spawn_gateway(&self) -> GatewayHandle {
        self.spawn_gateway_with(|_| {}).await
    }

    /// Like [`Sandbox::spawn_gateway`], adjusting this gateway's config.
    pub async fn spawn_gateway_with(&self, adjust: impl FnOnce(&mut Config)) -> GatewayHandle {
        let mut config = self.config.clone();
        adjust(&mut config);
        let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind") };
        let (http, grpc, ops) = (bind().await, bind().await, bind().await);
        let addrs = (http.local_addr().unwrap(), grpc.local_addr().unwrap(), ops.local_addr().unwrap());
        let token = self.shutdown.child_token();
        let listeners = herald_gateway::Listeners { http, grpc: Some(grpc), ops };
        let task = tokio::spawn(herald_gateway::run(config, listeners, token.clone()));
        let handle = GatewayHandle { http: addrs.0, grpc: addrs.1, ops: addrs.2, token, task };
        // Ready: its Redis subscription connection is live.
        crate::assert_eventually!(
            10,
            async { crate::http_get(handle.ops, "/readyz").await.starts_with("HTTP/1.1 200") },
            "gateway did not become ready"
        );
        handle
    }
}

/// How a WebSocket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

/// A WebSocket client speaking the gateway protocol.
pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Frames received while waiting for something else.
    pub buffered: std::collections::VecDeque<Value>,
}

/// Frames the client waits for at most this long (the test fails after).
const WAIT: Duration = Duration::from_secs(10);

impl WsClient {
    /// Opens a socket (no `connect` frame yet).
    pub async fn open(gateway: &GatewayHandle) -> Self {
        let (stream, _) = tokio_tungstenite::connect_async(gateway.ws_url()).await.expect("websocket upgrade");
        Self { stream, next_id: 1, buffered: Default::default() }
    }

    /// Opens a socket, or `None` when the upgrade is refused.
    pub async fn try_open(gateway: &GatewayHandle) -> Option<Self> {
        let (stream, _) = tokio_tungstenite::connect_async(gateway.ws_url()).await.ok()?;
        Some(Self { stream, next_id: 1, buffered: Default::default() })
    }

    /// Opens a socket and connects with `token`; panics unless connected.
    pub async fn connect(gateway: &GatewayHandle, token: &str) -> Self {
        let mut client = Self::open(gateway).await;
        let reply = client.request(json!({"type": "connect", "token": token})).await;
        assert_eq!(reply["type"], "connected", "connect failed: {reply}");
        client
    }

    pub async fn send(&mut self, frame: Value) {
        self.stream.send(Message::text(frame.to_string())).await.expect("send frame");
    }

    /// Sends `frame` `n` times as fast as the socket takes them, without
    /// reading; stops at the first error (the server closed).
    pub async fn flood(&mut self, frame: Value, n: usize) {
        let text = frame.to_string();
        for _ in 0..n {
            if self.stream.feed(Message::text(text.clone())).await.is_err() {
                return;
            }
        }
        let _ = self.stream.flush().await;
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send frame");
    }

    /// Sends a command with a fresh id and returns the reply with that id
    /// (other frames are kept in `buffered`).
    pub async fn request(&mut self, mut frame: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        frame["id"] = json!(id);
        self.send(frame).await;
        loop {
            let frame = self.next_raw().await.unwrap_or_else(|closed| panic!("closed waiting for reply: {closed:?}"));
            if frame["id"] == json!(id) || frame["type"] == "disconnect" {
                return frame;
            }
            self.buffered.push_back(frame);
        }
    }

    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.request(json!({"type": "subscribe", "channel": channel})).await
    }

    pub async fn subscribe_recover(&mut self, channel: &str, offset: u64, epoch: &str) -> Value {
        self.request(json!({"type": "subscribe", "channel": channel, "recover": {"offset": offset, "epoch": epoch}}))
            .await
    }

    /// The next frame (buffered first), or how the socket closed.
    pub async fn next_frame(&mut self) -> Result<Value, Closed> {
        if let Some(frame) = self.buffered.pop_front() {
            return Ok(frame);
        }
        self.next_raw().await
    }

    async fn next_raw(&mut self) -> Result<Value, Closed> {
        loop {
            let message = tokio::time::timeout(WAIT, self.stream.next()).await.expect("no frame within 10 s");
            match message {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).expect("frames are JSON")),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) =
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                    return Err(Closed { code, reason });
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Closed { code: 1006, reason: e.to_string() }),
                None => return Err(Closed { code: 1006, reason: "stream ended".into() }),
            }
        }
    }

    /// The next publication frame (skipping others).
    pub async fn next_pub(&mut self) -> Value {
        loop {
            let frame =
                self.next_frame().await.unwrap_or_else(|closed| panic!("closed waiting for a publication: {closed:?}"));
            match frame["type"].as_str() {
                Some("pub") => return frame,
                // A frame that ends the subscription or reports an error
                // means no publication is coming: say so now.
                Some("unsubscribed" | "error" | "disconnect") => panic!("waiting for a publication, got {frame}"),
                _ => {}
            }
        }
    }

    /// Sends a WebSocket ping every `every` and reads until the socket
    /// closes; returns how it closed (panics if it stays open for 10 s).
    pub async fn ping_until_closed(&mut self, every: Duration) -> Closed {
        let mut tick = tokio::time::interval(every);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(tokio::time::Instant::now() < deadline, "socket still open after 10 s of pings");
            tokio::select! {
                frame = self.next_raw() => if let Err(closed) = frame { return closed },
                _ = tick.tick() => {
                    // The server may have closed already: the read says how.
                    let _ = self.stream.send(Message::Ping(Vec::new().into())).await;
                }
            }
        }
    }

    /// Reads until the socket closes; returns the close and the
    /// `disconnect` frame if one came.
    pub async fn closed(&mut self) -> (Closed, Option<Value>) {
        let mut disconnect = None;
        loop {
            match self.next_frame().await {
                Ok(frame) if frame["type"] == "disconnect" => disconnect = Some(frame),
                Ok(_) => {}
                Err(closed) => return (closed, disconnect),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .stream
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}

/// `POST /v1/publish` over a real socket: (status, JSON body).
pub async fn http_publish(gateway: &GatewayHandle, token: Option<&str>, body: &Value) -> (u16, Value) {
    http_post(gateway.http, "/v1/publish", token, &body.to_string()).await
}

/// A minimal HTTP/1.1 POST of a JSON body: (status, JSON body or null).
pub async fn http_post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// gRPC `herald.v1.Publisher/Publish`.
pub async fn grpc_publish(
    gateway: &GatewayHandle,
    token: &str,
    request: herald_proto::v1::PublishRequest,
) -> Result<herald_proto::v1::PublishResponse, tonic::Status> {
    let mut client = herald_proto::v1::publisher_client::PublisherClient::connect(format!("http://{}", gateway.grpc))
        .await
        .expect("grpc connect");
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
    client.publish(request).await.map(|r| r.into_inner())
}
