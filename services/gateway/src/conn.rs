//! One WebSocket connection: the `connect` handshake, commands, the
//! subscriptions' answers, pings, draining what the socket did not take at
//! once, and the close with its code. Publications do not pass through
//! here: the hub writes them to the socket (see [`crate::socket`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt as _, StreamExt as _};
use herald_core::channel::{Channel, ChannelKeys, HistoryOptions};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior, interval};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument as _;

use crate::Ctx;
use crate::auth::Claims;
use crate::hub::{ConnId, SubLink};
use crate::limits::Bucket;
use crate::metrics::{CodeLabel, ResultLabel};
use crate::protocol::{ClientFrame, CloseCode, Position, ServerFrame, publication_frame};
use crate::recovery;
use crate::socket::{self, ConnIo, Writer};

/// How long a subscribe waits for the node's Redis subscription before it
/// answers in degraded mode.
const ACTIVE_WAIT: Duration = Duration::from_secs(3);

/// How long a connection closed as slow may take to accept its close frame
/// (its subscriptions and queue are released before).
const SLOW_CLOSE_WAIT: Duration = Duration::from_secs(15);

/// How long a closed connection keeps reading (and discarding) what its
/// client still sends, so that the close frame is not lost to a reset.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

type Ws = WebSocketStream<ConnIo>;

/// One subscription of a connection.
struct Sub {
    pubsub: String,
    link: Arc<SubLink>,
    /// The presence set joined and the member written there, if any.
    presence: Option<(String, String)>,
}

/// Why the session ended.
enum End {
    /// The client went away (or the socket failed): nothing to send.
    Gone,
    Close(CloseCode, String),
}

struct Conn<'a> {
    ctx: &'a Ctx,
    id: ConnId,
    client: String,
    claims: Claims,
    writer: Arc<Writer>,
    subs: HashMap<Arc<str>, Sub>,
    commands: Bucket,
}

/// Serves one upgraded socket (and the bytes the client sent after its
/// upgrade request) until it closes.
pub async fn serve(tcp: TcpStream, read: Vec<u8>, ctx: Arc<Ctx>) {
    let id = ctx.next_conn_id();
    let client = format!("{}-{id}", ctx.node);
    let span = tracing::info_span!("ws", client = %client, tenant = tracing::field::Empty);
    ctx.metrics.sockets.inc();
    async {
        let limits = &ctx.gateway.limits;
        let (read_half, write_half) = tcp.into_split();
        let writer = Arc::new(Writer::new(write_half, limits.max_queue_bytes));
        let config = WebSocketConfig::default()
            .read_buffer_size(2048)
            .write_buffer_size(0)
            .max_message_size(Some(limits.max_frame_bytes))
            .max_frame_size(Some(limits.max_frame_bytes));
        let io = ConnIo::new(read_half, writer.clone());
        let mut ws = WebSocketStream::from_partially_read(io, read, Role::Server, Some(config)).await;
        let end = match handshake(&mut ws, &ctx).await {
            Ok((claims, request_id)) => {
                tracing::Span::current().record("tenant", claims.tenant.as_str());
                let rate = limits.connection_commands_per_s as f64;
                // A client subscribing to all its channels right after
                // connecting is not flooding: the burst covers that.
                let burst = rate * 2.0 + limits.max_subscriptions_per_connection as f64;
                let mut conn = Conn {
                    ctx: &ctx,
                    id,
                    client,
                    claims,
                    writer: writer.clone(),
                    subs: HashMap::new(),
                    commands: Bucket::new(rate, burst),
                };
                let end = conn.run(&mut ws, request_id).await;
                conn.release().await;
                end
            }
            Err(end) => end,
        };
        if let End::Close(code, reason) = end {
            ctx.metrics.closes.get_or_create(&CodeLabel { code: code as u16 }).inc();
            if code == CloseCode::Slow {
                ctx.metrics.slow_closes.inc();
            }
            tracing::debug!(code = code as u16, %reason, "closing websocket");
            close(&writer, &ctx, code, &reason).await;
            linger(&mut ws).await;
        }
    }
    .instrument(span)
    .await;
    ctx.metrics.sockets.dec();
}

/// Sends the `disconnect` frame and the close frame, bounded in time.
async fn close(writer: &Writer, ctx: &Ctx, code: CloseCode, reason: &str) {
    let reconnect_after_ms = (code == CloseCode::Shutdown)
        .then(|| rand::random_range(0..ctx.gateway.reconnect_jitter_ms.max(1)))
        .or_else(|| code.reconnect().then_some(1_000));
    let frame = ServerFrame::Disconnect { code: code as u16, reason, reconnect: code.reconnect(), reconnect_after_ms };
    let mut frames = BytesMut::new();
    socket::put_text(&mut frames, &frame.text());
    socket::put_close(&mut frames, code as u16, reason);
    // A slow client gets longer: its socket is full of publications that it
    // has to read before it sees why it was closed.
    let wait = if code == CloseCode::Slow { SLOW_CLOSE_WAIT } else { Duration::from_secs(2) };
    writer.finish(frames.freeze(), wait).await;
}

/// After the close frame: reads (and ignores) what the client still sends
/// until its own close frame arrives, or it goes, or [`CLOSE_LINGER`]
/// passes. Closing a socket with unread bytes makes the kernel reset it,
/// and the reset can discard the close frame before the client reads it
/// (the client then sees 1006, not the code that tells it why).
async fn linger(ws: &mut Ws) {
    let drained = async {
        while let Some(Ok(message)) = ws.next().await {
            if matches!(message, Message::Close(_)) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, drained).await;
}

/// Reads the `connect` frame and verifies its token.
async fn handshake(ws: &mut Ws, ctx: &Ctx) -> Result<(Claims, Option<u64>), End> {
    // One deadline for the whole handshake: pings do not extend it.
    let deadline = Instant::now() + Duration::from_millis(ctx.gateway.connect_timeout_ms);
    let first = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(End::Close(CloseCode::ConnectTimeout, "no connect frame".into())),
            Ok(None) => return Err(End::Gone),
            Ok(Some(Err(e))) => return Err(recv_error(e)),
            Ok(Some(Ok(Message::Text(text)))) => break text,
            Ok(Some(Ok(Message::Close(_)))) => return Err(closed_by_client(ws).await),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
            Ok(Some(Ok(Message::Binary(_)))) => {
                return Err(End::Close(CloseCode::BadRequest, "frames are JSON text".into()));
            }
        }
    };
    let (id, token) = match serde_json::from_str::<ClientFrame>(&first) {
        Ok(ClientFrame::Connect { id, token }) => (id, token),
        Ok(_) => return Err(End::Close(CloseCode::BadRequest, "the first frame must be connect".into())),
        Err(e) => return Err(End::Close(CloseCode::BadRequest, format!("malformed frame: {e}"))),
    };
    let claims = ctx.verifier.verify(&token).map_err(|e| {
        ctx.metrics.refused_connections.get_or_create(&ResultLabel { result: "auth" }).inc();
        End::Close(e.close_code(), e.to_string())
    })?;
    if !ctx.tenant_limiter.take(&claims.tenant).await {
        ctx.metrics.rate_limited.inc();
        return Err(End::Close(CloseCode::RateLimited, "tenant rate limit".into()));
    }
    Ok((claims, id))
}

/// The client closed: tungstenite has queued the close reply; write it.
async fn closed_by_client(ws: &mut Ws) -> End {
    let _ = ws.flush().await;
    End::Gone
}

fn recv_error(e: WsError) -> End {
    match e {
        WsError::Capacity(_) => End::Close(CloseCode::MessageTooBig, "frame over the size limit".into()),
        WsError::Utf8(_) => End::Close(CloseCode::BadRequest, "text frames must be UTF-8".into()),
        _ => End::Gone,
    }
}

impl Conn<'_> {
    /// Writes a reply frame; an end when the connection is slow or gone.
    fn reply(&self, text: &str) -> Option<End> {
        self.written(self.writer.send(socket::text(text)))
    }

    /// `None` when the writer took what it was given, else why not.
    fn written(&self, taken: bool) -> Option<End> {
        if taken { None } else { Some(self.writer_end()) }
    }

    /// Why the writer refused: the connection is slow, or its socket failed.
    fn writer_end(&self) -> End {
        if self.writer.is_slow() { End::Close(CloseCode::Slow, "outgoing queue overflowed".into()) } else { End::Gone }
    }

    async fn run(&mut self, ws: &mut Ws, request_id: Option<u64>) -> End {
        let limits = &self.ctx.gateway.limits;
        let connected =
            ServerFrame::Connected { id: request_id, client: &self.client, ping_interval_ms: limits.ping_interval_ms };
        if let Some(end) = self.reply(&connected.text()) {
            return end;
        }
        let ping_timeout = Duration::from_millis(limits.ping_timeout_ms);
        let mut ping = interval(Duration::from_millis(limits.ping_interval_ms));
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.reset();
        let mut last_seen = Instant::now();
        // Both futures live across iterations: re-registering with the
        // node-wide shutdown token on every wake-up would make thousands of
        // sockets contend for its lock during a broadcast.
        let shutdown = self.ctx.shutdown.clone().cancelled_owned();
        tokio::pin!(shutdown);
        let writer = self.writer.clone();
        let mut wake = std::pin::pin!(writer.wake.notified());
        let expiry = tokio::time::sleep_until(token_deadline(self.claims.valid_until));
        tokio::pin!(expiry);
        loop {
            let pending = writer.has_pending();
            tokio::select! {
                _ = &mut shutdown => return End::Close(CloseCode::Shutdown, "node shutting down".into()),
                _ = &mut expiry => return End::Close(CloseCode::TokenExpired, "token expired".into()),
                _ = &mut wake => {
                    wake.set(writer.wake.notified());
                    if let Some(end) = Box::pin(self.on_wake()).await {
                        return end;
                    }
                }
                writable = writer.writable(), if pending => {
                    if writable.is_err() || writer.flush_pending().is_err() {
                        return End::Gone;
                    }
                }
                message = ws.next() => {
                    last_seen = Instant::now();
                    let text = match message {
                        None => return End::Gone,
                        Some(Err(e)) => return recv_error(e),
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Binary(_))) => return End::Close(CloseCode::BadRequest, "frames are JSON text".into()),
                        Some(Ok(Message::Close(_))) => return closed_by_client(ws).await,
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    };
                    if !self.commands.take() {
                        self.ctx.metrics.rate_limited.inc();
                        return End::Close(CloseCode::RateLimited, "too many commands".into());
                    }
                    // Boxed: the command path is large and rare, the idle
                    // connection's future stays small.
                    if let Some(end) = Box::pin(self.command(&text)).await {
                        return end;
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > ping_timeout {
                        return End::Close(CloseCode::PingTimeout, "no frame within the ping timeout".into());
                    }
                    if !writer.send(socket::ping()) {
                        return self.writer_end();
                    }
                }
            }
        }
    }

    /// The writer has news: the connection became slow or its socket
    /// failed, subscriptions ended on a gap, or bytes wait to be written.
    async fn on_wake(&mut self) -> Option<End> {
        if self.writer.is_slow() || self.writer.is_closed() {
            return Some(self.writer_end());
        }
        for channel in self.writer.take_resync() {
            if self.end_subscription(&channel).await {
                let frame = ServerFrame::Unsubscribed {
                    id: None,
                    channel: &channel,
                    reason: Some("insufficient_state"),
                    resubscribe: true,
                };
                if let Some(end) = self.reply(&frame.text()) {
                    return Some(end);
                }
            }
        }
        if self.writer.flush_pending().is_err() {
            return Some(End::Gone);
        }
        None
    }

    /// Handles one client frame; returns an end when the connection must
    /// close.
    async fn command(&mut self, text: &str) -> Option<End> {
        let frame = match serde_json::from_str::<ClientFrame>(text) {
            Ok(frame) => frame,
            Err(e) => return Some(End::Close(CloseCode::BadRequest, format!("malformed frame: {e}"))),
        };
        let reply = match frame {
            ClientFrame::Connect { id, .. } => error(id, 400, "already connected"),
            ClientFrame::Ping { id } => ServerFrame::Pong { id }.text(),
            ClientFrame::Subscribe { id, channel, recover } => return self.subscribe(id, &channel, recover).await,
            ClientFrame::Unsubscribe { id, channel } => {
                if self.end_subscription(&channel).await {
                    ServerFrame::Unsubscribed { id, channel: &channel, reason: None, resubscribe: false }.text()
                } else {
                    error(id, 404, "not subscribed")
                }
            }
            ClientFrame::Presence { id, channel } => self.presence(id, &channel).await,
        };
        self.reply(&reply)
    }

    /// Checks a channel name against the namespaces and the token.
    fn permitted(&self, id: Option<u64>, name: &str) -> Result<(Channel, HistoryOptions, bool), String> {
        let channel = Channel::parse(name).map_err(|e| error(id, 400, &e.to_string()))?;
        let ns = self
            .ctx
            .gateway
            .namespace(channel.namespace())
            .ok_or_else(|| error(id, 404, &format!("unknown namespace {}", channel.namespace())))?;
        if !self.claims.allows(&channel) {
            return Err(error(id, 403, "the token does not allow this channel"));
        }
        if self.ctx.ops.as_ref().is_some_and(|ops| !ops.allows(&self.claims.tenant, &channel)) {
            return Err(error(id, 403, "this namespace is the ops tenant's"));
        }
        Ok((channel, HistoryOptions { size: ns.history_size, ttl_s: ns.history_ttl_s }, ns.presence))
    }

    /// Subscribes: joins the hub (publications from here on are held),
    /// reads the channel's position (and what the client missed, when it
    /// recovers), then answers and goes live in one step, so the client sees
    /// `subscribed`, then recovered publications, then new ones, in order and
    /// without duplicates.
    async fn subscribe(&mut self, id: Option<u64>, name: &str, recover: Option<Position>) -> Option<End> {
        let (channel, history, presence) = match self.permitted(id, name) {
            Ok(p) => p,
            Err(reply) => return self.reply(&reply),
        };
        if self.subs.contains_key(name) {
            return self.reply(&error(id, 409, "already subscribed"));
        }
        if self.subs.len() >= self.ctx.gateway.limits.max_subscriptions_per_connection {
            return self.reply(&error(id, 429, "too many subscriptions on this connection"));
        }
        if !self.ctx.tenant_limiter.take(&self.claims.tenant).await {
            self.ctx.metrics.rate_limited.inc();
            return self.reply(&error(id, 429, "tenant rate limit"));
        }
        let tenant = self.claims.tenant.clone();
        let key: Arc<str> = name.into();
        let link = Arc::new(SubLink::new(self.writer.clone(), key.clone(), self.ctx.gateway.limits.max_queue_bytes));
        let pubsub = self.ctx.hub.join(self.id, link.clone(), &tenant, &channel, history);
        self.subs.insert(key, Sub { pubsub: pubsub.clone(), link: link.clone(), presence: None });

        let active = self.ctx.hub.wait_active(&pubsub, ACTIVE_WAIT).await;
        let read = if active {
            let max_bytes = self.ctx.gateway.limits.max_queue_bytes;
            let (redis, keys) = (&self.ctx.redis, self.ctx.hub.keys());
            recovery::read(redis, keys, &tenant, &channel, recover.as_ref(), history.size, max_bytes).await.ok()
        } else {
            None
        };
        if presence {
            let key = ChannelKeys::new(self.ctx.hub.keys(), &tenant, &channel).presence();
            let member = crate::presence::Presence::member(&self.client, &self.claims.subject);
            self.ctx.presence.join(&key, member.clone()).await;
            if let Some(sub) = self.subs.get_mut(name) {
                sub.presence = Some((key, member));
            }
        }
        let mut replies = BytesMut::new();
        let Some(h) = read else {
            // Redis is unreachable: live delivery from this node only.
            if recover.is_some() {
                self.ctx.metrics.recoveries.get_or_create(&ResultLabel { result: "degraded" }).inc();
            }
            let frame = ServerFrame::Subscribed {
                id,
                channel: name,
                offset: 0,
                epoch: "",
                head: 0,
                recovered: recover.map(|_| false),
                missed: 0,
                degraded: true,
            };
            socket::put_text(&mut replies, &frame.text());
            return self.written(link.go_live(None, true, replies.freeze()));
        };
        self.ctx.metrics.recovery_reads.inc_by(h.read);
        let epoch = h.epoch.clone().unwrap_or_default();
        let recovered = h.recovered;
        if let Some(ok) = recovered {
            let result = if ok { "recovered" } else { "not_recovered" };
            self.ctx.metrics.recoveries.get_or_create(&ResultLabel { result }).inc();
        }
        let position = h.epoch.as_ref().map(|_| (Arc::<str>::from(epoch.as_str()), h.head));
        // What the client stores must never run ahead of what it has
        // received: during a replay that is where the replay starts.
        let offset = match (&recover, recovered) {
            (Some(from), Some(true)) => from.offset,
            _ => h.head,
        };
        let frame = ServerFrame::Subscribed {
            id,
            channel: name,
            offset,
            epoch: &epoch,
            head: h.head,
            recovered,
            missed: h.publications.len(),
            degraded: false,
        };
        socket::put_text(&mut replies, &frame.text());
        for p in &h.publications {
            if let Ok(data) = std::str::from_utf8(&p.data) {
                socket::put_text(&mut replies, &publication_frame(name, p.offset, &epoch, data));
            }
        }
        self.written(link.go_live(position, false, replies.freeze()))
    }

    async fn presence(&mut self, id: Option<u64>, name: &str) -> String {
        let (channel, _, presence) = match self.permitted(id, name) {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        if !presence {
            return error(id, 404, "presence is off for this namespace");
        }
        let key = ChannelKeys::new(self.ctx.hub.keys(), &self.claims.tenant, &channel).presence();
        match self.ctx.presence.list(&key).await {
            Ok(clients) => ServerFrame::Presence { id, channel: name, clients }.text(),
            Err(_) => error(id, 503, "presence is unavailable (redis)"),
        }
    }

    /// Ends a subscription here, in the hub and in presence; false if there
    /// was none.
    async fn end_subscription(&mut self, channel: &str) -> bool {
        let Some(sub) = self.subs.remove(channel) else { return false };
        sub.link.end();
        self.ctx.hub.leave(self.id, &sub.pubsub);
        if let Some((key, member)) = sub.presence {
            self.ctx.presence.leave(&key, member).await;
        }
        true
    }

    /// Leaves every channel (the connection is closing).
    async fn release(&mut self) {
        let channels: Vec<Arc<str>> = self.subs.keys().cloned().collect();
        for channel in channels {
            self.end_subscription(&channel).await;
        }
    }
}

/// The instant a token valid until `valid_until` (Unix seconds) runs out.
fn token_deadline(valid_until: u64) -> Instant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Instant::now() + Duration::from_secs(valid_until).saturating_sub(now)
}

fn error(id: Option<u64>, code: u16, message: &str) -> String {
    ServerFrame::Error { id, code, message }.text()
}
