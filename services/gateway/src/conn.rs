//! One WebSocket connection: the `connect` handshake, commands, delivery
//! from the connection's bounded queue (in order, without duplicates, gaps
//! turned into a resubscribe request), pings, and the close with its code.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::SinkExt as _;
use herald_core::channel::{self, Channel, ChannelKeys, HistoryOptions};
use tokio::time::{Instant, MissedTickBehavior, interval};
use tracing::Instrument as _;

use crate::Ctx;
use crate::auth::Claims;
use crate::hub::{ConnId, Out, Outbox};
use crate::limits::Bucket;
use crate::metrics::{CodeLabel, ResultLabel};
use crate::protocol::{ClientFrame, CloseCode, Position, ServerFrame, publication_frame};

/// How long a subscribe waits for the node's Redis subscription before it
/// answers in degraded mode.
const ACTIVE_WAIT: Duration = Duration::from_secs(3);

/// How long a connection closed as slow may take to accept its close frame
/// (its subscriptions and queue are released before).
const SLOW_CLOSE_WAIT: Duration = Duration::from_secs(15);

/// One subscription of a connection.
struct Sub {
    pubsub: String,
    /// Epoch and offset of the last publication sent (or of the position
    /// at subscribe time); `None` until known.
    position: Option<(Arc<str>, u64)>,
    presence: Option<String>,
    /// Subscribed while Redis was down: no position. The first publication
    /// from Redis (it is back) ends the subscription with `resubscribe`, so
    /// the client recovers what it missed instead of silently skipping it.
    degraded: bool,
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
    outbox: Arc<Outbox>,
    subs: HashMap<Arc<str>, Sub>,
    commands: Bucket,
}

/// Serves one upgraded socket until it closes.
pub async fn serve(mut ws: WebSocket, ctx: Arc<Ctx>) {
    let id = ctx.next_conn_id();
    let client = format!("{}-{id}", ctx.node);
    let span = tracing::info_span!("ws", client = %client, tenant = tracing::field::Empty);
    ctx.metrics.sockets.inc();
    async {
        let end = match handshake(&mut ws, &ctx).await {
            Ok((claims, request_id)) => {
                tracing::Span::current().record("tenant", claims.tenant.as_str());
                let limits = &ctx.gateway.limits;
                let rate = limits.connection_commands_per_s as f64;
                let mut conn = Conn {
                    ctx: &ctx,
                    id,
                    client,
                    claims,
                    outbox: Arc::new(Outbox::new(limits.max_queue_bytes)),
                    subs: HashMap::new(),
                    commands: Bucket::new(rate, rate * 2.0),
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
            close(&mut ws, &ctx, code, &reason).await;
        }
    }
    .instrument(span)
    .await;
    ctx.metrics.sockets.dec();
}

/// Sends the `disconnect` frame and the close frame, bounded in time.
async fn close(ws: &mut WebSocket, ctx: &Ctx, code: CloseCode, reason: &str) {
    let reconnect_after_ms = (code == CloseCode::Shutdown)
        .then(|| rand::random_range(0..ctx.gateway.reconnect_jitter_ms.max(1)))
        .or_else(|| code.reconnect().then_some(1_000));
    let frame = ServerFrame::Disconnect { code: code as u16, reason, reconnect: code.reconnect(), reconnect_after_ms };
    let mut short = reason.to_string();
    short.truncate(120);
    let sent = async {
        // A slow client's socket may not take even this: ignore errors.
        let _ = ws.feed(Message::Text(frame.text())).await;
        let _ = ws.feed(Message::Close(Some(CloseFrame { code: code as u16, reason: Utf8Bytes::from(short) }))).await;
        let _ = ws.flush().await;
    };
    // A slow client gets longer: its socket is full of publications that it
    // has to read before it sees why it was closed.
    let wait = if code == CloseCode::Slow { SLOW_CLOSE_WAIT } else { Duration::from_secs(2) };
    let _ = tokio::time::timeout(wait, sent).await;
}

/// Reads the `connect` frame and verifies its token.
async fn handshake(ws: &mut WebSocket, ctx: &Ctx) -> Result<(Claims, Option<u64>), End> {
    let deadline = Duration::from_millis(ctx.gateway.connect_timeout_ms);
    let first = loop {
        match tokio::time::timeout(deadline, ws.recv()).await {
            Err(_) => return Err(End::Close(CloseCode::ConnectTimeout, "no connect frame".into())),
            Ok(None) => return Err(End::Gone),
            Ok(Some(Err(e))) => return Err(recv_error(&e)),
            Ok(Some(Ok(Message::Text(text)))) => break text,
            Ok(Some(Ok(Message::Close(_)))) => return Err(End::Gone),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
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

fn recv_error(e: &axum::Error) -> End {
    let text = e.to_string();
    if text.contains("Space limit") || text.contains("too long") || text.contains("too big") {
        End::Close(CloseCode::MessageTooBig, "frame over the size limit".into())
    } else {
        End::Gone
    }
}

impl Conn<'_> {
    async fn run(&mut self, ws: &mut WebSocket, request_id: Option<u64>) -> End {
        let limits = &self.ctx.gateway.limits;
        let connected =
            ServerFrame::Connected { id: request_id, client: &self.client, ping_interval_ms: limits.ping_interval_ms };
        if ws.send(Message::Text(connected.text())).await.is_err() {
            return End::Gone;
        }
        let ping_timeout = Duration::from_millis(limits.ping_timeout_ms);
        let mut ping = interval(Duration::from_millis(limits.ping_interval_ms));
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.reset();
        let mut last_seen = Instant::now();
        let mut batch = VecDeque::new();
        // Both futures live across iterations: re-registering with the
        // node-wide shutdown token on every wake-up would make thousands of
        // sockets contend for its lock during a broadcast.
        let shutdown = self.ctx.shutdown.clone().cancelled_owned();
        tokio::pin!(shutdown);
        let outbox = self.outbox.clone();
        let mut ready = std::pin::pin!(outbox.ready.notified());
        loop {
            tokio::select! {
                _ = &mut shutdown => return End::Close(CloseCode::Shutdown, "node shutting down".into()),
                _ = &mut ready => {
                    ready.set(outbox.ready.notified());
                    // Boxed like the command path: only a socket with
                    // something to write pays for the writing state.
                    if let Some(end) = Box::pin(self.flush(ws, &mut batch)).await {
                        return end;
                    }
                }
                message = ws.recv() => {
                    last_seen = Instant::now();
                    let text = match message {
                        None => return End::Gone,
                        Some(Err(e)) => return recv_error(&e),
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Binary(_))) => return End::Close(CloseCode::BadRequest, "frames are JSON text".into()),
                        Some(Ok(Message::Close(_))) => return End::Gone,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    };
                    if !self.commands.take() {
                        self.ctx.metrics.rate_limited.inc();
                        return End::Close(CloseCode::RateLimited, "too many commands".into());
                    }
                    // Boxed: the command path is large and rare, the idle
                    // connection's future stays small.
                    if let Some(end) = Box::pin(self.command(ws, &text)).await {
                        return end;
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > ping_timeout {
                        return End::Close(CloseCode::PingTimeout, "no frame within the ping timeout".into());
                    }
                    if ws.send(Message::Ping(Default::default())).await.is_err() {
                        return End::Gone;
                    }
                }
            }
        }
    }

    /// Writes what is queued. Returns an end when the connection is slow
    /// (its queue overflowed, or the socket does not take writes while the
    /// queue fills) or gone.
    async fn flush(&mut self, ws: &mut WebSocket, batch: &mut VecDeque<Out>) -> Option<End> {
        loop {
            let bytes = match self.outbox.take(batch) {
                Some(0) => return None,
                Some(n) => n,
                None => return Some(End::Close(CloseCode::Slow, "outgoing queue overflowed".into())),
            };
            let outbox = self.outbox.clone();
            let write = async {
                let mut resync = Vec::new();
                while let Some(out) = batch.pop_front() {
                    match out {
                        Out::Pub { channel, offset, epoch, frame } => match self.accept(&channel, offset, &epoch) {
                            Accept::Send => ws.feed(Message::Text(frame)).await?,
                            Accept::Gap => resync.push(channel),
                            Accept::Skip => {}
                        },
                        Out::Resync { channel } => resync.push(channel),
                    }
                }
                ws.flush().await?;
                Ok::<_, axum::Error>(resync)
            };
            let resync = tokio::select! {
                written = write => match written {
                    Ok(resync) => resync,
                    Err(_) => return Some(End::Gone),
                },
                _ = outbox.slow.notified() => {
                    return Some(End::Close(CloseCode::Slow, "outgoing queue overflowed".into()));
                }
            };
            self.outbox.written(bytes);
            for channel in resync {
                if self.end_subscription(&channel).await {
                    let frame = ServerFrame::Unsubscribed {
                        id: None,
                        channel: &channel,
                        reason: Some("insufficient_state"),
                        resubscribe: true,
                    };
                    if ws.send(Message::Text(frame.text())).await.is_err() {
                        return Some(End::Gone);
                    }
                }
            }
        }
    }

    /// Whether a publication is the next one of a subscription (and moves
    /// its position), an old one, or one after a gap.
    fn accept(&mut self, channel: &str, offset: u64, epoch: &Arc<str>) -> Accept {
        let Some(sub) = self.subs.get_mut(channel) else { return Accept::Skip };
        if offset == 0 {
            return Accept::Send;
        }
        if sub.degraded {
            return Accept::Gap;
        }
        match &sub.position {
            None => {}
            Some((e, last)) if *e == *epoch => {
                if offset <= *last {
                    return Accept::Skip;
                }
                if offset > last + 1 {
                    return Accept::Gap;
                }
            }
            Some(_) if offset != 1 => return Accept::Gap,
            Some(_) => {}
        }
        sub.position = Some((epoch.clone(), offset));
        Accept::Send
    }

    /// Handles one client frame; returns an end when the connection must
    /// close.
    async fn command(&mut self, ws: &mut WebSocket, text: &str) -> Option<End> {
        let frame = match serde_json::from_str::<ClientFrame>(text) {
            Ok(frame) => frame,
            Err(e) => return Some(End::Close(CloseCode::BadRequest, format!("malformed frame: {e}"))),
        };
        let replies = match frame {
            ClientFrame::Connect { id, .. } => vec![error(id, 400, "already connected")],
            ClientFrame::Ping { id } => vec![ServerFrame::Pong { id }.text()],
            ClientFrame::Subscribe { id, channel, recover } => self.subscribe(id, &channel, recover).await,
            ClientFrame::Unsubscribe { id, channel } => {
                if self.end_subscription(&channel).await {
                    vec![ServerFrame::Unsubscribed { id, channel: &channel, reason: None, resubscribe: false }.text()]
                } else {
                    vec![error(id, 404, "not subscribed")]
                }
            }
            ClientFrame::Presence { id, channel } => vec![self.presence(id, &channel).await],
        };
        for reply in replies {
            if ws.feed(Message::Text(reply)).await.is_err() {
                return Some(End::Gone);
            }
        }
        if ws.flush().await.is_err() {
            return Some(End::Gone);
        }
        None
    }

    /// Checks a channel name against the namespaces and the token.
    fn permitted(&self, id: Option<u64>, name: &str) -> Result<(Channel, HistoryOptions, bool), Utf8Bytes> {
        let channel = Channel::parse(name).map_err(|e| error(id, 400, &e.to_string()))?;
        let ns = self
            .ctx
            .gateway
            .namespace(channel.namespace())
            .ok_or_else(|| error(id, 404, &format!("unknown namespace {}", channel.namespace())))?;
        if !self.claims.allows(&channel) {
            return Err(error(id, 403, "the token does not allow this channel"));
        }
        Ok((channel, HistoryOptions { size: ns.history_size, ttl_s: ns.history_ttl_s }, ns.presence))
    }

    async fn subscribe(&mut self, id: Option<u64>, name: &str, recover: Option<Position>) -> Vec<Utf8Bytes> {
        let (channel, history, presence) = match self.permitted(id, name) {
            Ok(p) => p,
            Err(reply) => return vec![reply],
        };
        if self.subs.contains_key(name) {
            return vec![error(id, 409, "already subscribed")];
        }
        if self.subs.len() >= self.ctx.gateway.limits.max_subscriptions_per_connection {
            return vec![error(id, 429, "too many subscriptions on this connection")];
        }
        if !self.ctx.tenant_limiter.take(&self.claims.tenant).await {
            self.ctx.metrics.rate_limited.inc();
            return vec![error(id, 429, "tenant rate limit")];
        }
        let tenant = self.claims.tenant.clone();
        let pubsub = self.ctx.hub.join(self.id, self.outbox.clone(), &tenant, &channel, history);
        let key: Arc<str> = name.into();
        self.subs.insert(key.clone(), Sub { pubsub: pubsub.clone(), position: None, presence: None, degraded: false });

        let active = self.ctx.hub.wait_active(&pubsub, ACTIVE_WAIT).await;
        let limit = if recover.is_some() { history.size } else { 0 };
        let since = recover.as_ref().map_or(0, |p| p.offset);
        let read = if active {
            channel::history_since(&self.ctx.redis, self.ctx.hub.keys(), &tenant, &channel, since, limit).await.ok()
        } else {
            None
        };
        if presence {
            let key = ChannelKeys::new(self.ctx.hub.keys(), &tenant, &channel).presence();
            let member = crate::presence::Presence::member(&self.client, &self.claims.subject);
            self.ctx.presence.join(&key, member.clone()).await;
            if let Some(sub) = self.subs.get_mut(name) {
                sub.presence = Some(member);
            }
        }
        let Some(h) = read else {
            // Redis is unreachable: live delivery from this node only.
            if let Some(sub) = self.subs.get_mut(name) {
                sub.degraded = true;
            }
            if recover.is_some() {
                self.ctx.metrics.recoveries.get_or_create(&ResultLabel { result: "degraded" }).inc();
            }
            return vec![
                ServerFrame::Subscribed {
                    id,
                    channel: name,
                    offset: 0,
                    epoch: "",
                    recovered: recover.map(|_| false),
                    missed: 0,
                    degraded: true,
                }
                .text(),
            ];
        };
        let epoch = h.epoch.clone().unwrap_or_default();
        let recovered =
            recover.as_ref().map(|p| h.epoch.as_deref() == Some(p.epoch.as_str()) && h.complete_after(p.offset));
        if let Some(ok) = recovered {
            let result = if ok { "recovered" } else { "not_recovered" };
            self.ctx.metrics.recoveries.get_or_create(&ResultLabel { result }).inc();
        }
        let epoch_arc: Arc<str> = epoch.as_str().into();
        if let Some(sub) = self.subs.get_mut(name) {
            sub.position = h.epoch.as_ref().map(|_| (epoch_arc.clone(), h.offset));
        }
        let missed = if recovered == Some(true) { h.publications.len() } else { 0 };
        let mut replies = Vec::with_capacity(missed + 1);
        replies.push(
            ServerFrame::Subscribed {
                id,
                channel: name,
                offset: h.offset,
                epoch: &epoch,
                recovered,
                missed,
                degraded: false,
            }
            .text(),
        );
        if recovered == Some(true) {
            for p in &h.publications {
                if let Ok(data) = std::str::from_utf8(&p.data) {
                    replies.push(publication_frame(name, p.offset, &epoch, data));
                }
            }
        }
        replies
    }

    async fn presence(&mut self, id: Option<u64>, name: &str) -> Utf8Bytes {
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
        self.ctx.hub.leave(self.id, &sub.pubsub);
        if let Some(member) = sub.presence {
            self.ctx.presence.leave(&format!("{}:pres", sub.pubsub), member).await;
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

#[derive(Debug, PartialEq, Eq)]
enum Accept {
    Send,
    Skip,
    Gap,
}

fn error(id: Option<u64>, code: u16, message: &str) -> Utf8Bytes {
    ServerFrame::Error { id, code, message }.text()
}
