//! A connection's socket after the upgrade: the handshake answer, the one
//! output path every byte goes through ([`Writer`]), and server frames.
//!
//! Why not axum's `WebSocket`: it owns the socket, so every publication had
//! to wake the connection's task, which then encoded the frame again for its
//! socket and wrote it. A broadcast to thousands of sockets paid for that
//! thousands of times. Here the hub encodes a publication's frame once and
//! writes it straight into every socket that takes it (one non-blocking
//! `send` each); only what a socket does not take is queued, bounded in
//! bytes, for the connection's task to write when the socket drains.
//! Reading stays with tungstenite, whose automatic replies (pong, close) go
//! through the same [`Writer`], so frames never interleave.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// A checked WebSocket upgrade request (RFC 6455 §4.2.1, HTTP/1.1).
pub struct Upgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    accept: HeaderValue,
}

/// Why an upgrade request was refused, as the response to send.
#[derive(Debug)]
pub struct Refused(StatusCode, &'static str);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut response = (self.0, self.1).into_response();
        if self.0 == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        response
    }
}

impl Upgrade {
    /// Checks the request.
    pub fn from_request(mut request: Request) -> Result<Self, Refused> {
        let headers = request.headers();
        if request.method() != Method::GET {
            return Err(Refused(StatusCode::METHOD_NOT_ALLOWED, "a WebSocket upgrade is a GET\n"));
        }
        if !has_token(headers, header::CONNECTION, "upgrade") || !has_token(headers, header::UPGRADE, "websocket") {
            return Err(Refused(StatusCode::UPGRADE_REQUIRED, "this endpoint speaks WebSocket\n"));
        }
        if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
            return Err(Refused(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13\n"));
        }
        let key = match headers.get(header::SEC_WEBSOCKET_KEY) {
            Some(key) if !key.is_empty() => key,
            _ => return Err(Refused(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing\n")),
        };
        let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 is a header value");
        let Some(on_upgrade) = request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(Refused(StatusCode::UPGRADE_REQUIRED, "this connection cannot be upgraded\n"));
        };
        Ok(Self { on_upgrade, accept })
    }

    /// The `101 Switching Protocols` answer, and the socket once hyper has
    /// sent it: the TCP stream and any bytes the client sent after its
    /// request (copied: hyper's read buffer is not kept alive with them).
    pub fn accept(self) -> (Response, impl Future<Output = io::Result<(TcpStream, Vec<u8>)>>) {
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, self.accept)
            .body(Body::empty())
            .expect("static headers are valid");
        let socket = async move {
            let upgraded = self.on_upgrade.await.map_err(io::Error::other)?;
            let parts = hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded)
                .map_err(|_| io::Error::other("the upgraded connection is not a TCP stream"))?;
            Ok((parts.io.into_inner(), parts.read_buf.to_vec()))
        };
        (response, socket)
    }
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
}

/// A connection's output. Frames are written at once when nothing is queued
/// and the socket takes them; the rest waits, bounded by `max_bytes`, for
/// [`Writer::flush_pending`]. Past the bound the connection is slow: what it
/// had queued is dropped (but a frame already partly written is kept whole,
/// so the stream stays well-formed) and nothing more is accepted.
pub struct Writer {
    io: OwnedWriteHalf,
    state: Mutex<State>,
    /// The connection's task has something to do: bytes to write, a
    /// subscription to end, or the connection became slow or failed.
    pub wake: Notify,
    max_bytes: usize,
}

#[derive(Default)]
struct State {
    pending: VecDeque<Bytes>,
    bytes: usize,
    /// The front of `pending` is the rest of a frame the socket took part of.
    front_started: bool,
    slow: bool,
    /// Writing failed or the connection is closing: nothing more is taken.
    closed: bool,
    /// Channels whose subscription the server ended (a gap it could not
    /// fill); the task tells the client to resubscribe.
    resync: Vec<Arc<str>>,
}

impl State {
    /// The connection is slow: what it had queued is dropped, except the
    /// rest of a frame the socket took part of (the stream stays whole).
    fn overflow(&mut self) {
        self.slow = true;
        let keep = if self.front_started { self.pending.pop_front() } else { None };
        self.pending.clear();
        self.bytes = keep.as_ref().map_or(0, Bytes::len);
        self.pending.extend(keep);
    }
}

impl Writer {
    pub fn new(io: OwnedWriteHalf, max_bytes: usize) -> Self {
        Self { io, state: Mutex::default(), wake: Notify::new(), max_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes or queues `frames` (whole frames); false when the connection
    /// is slow or closed, and nothing was taken.
    pub fn send(&self, frames: Bytes) -> bool {
        let mut s = self.lock();
        if s.slow || s.closed {
            return false;
        }
        let mut rest = frames;
        let was_empty = s.pending.is_empty();
        if was_empty {
            match self.io.try_write(&rest) {
                Ok(n) if n == rest.len() => return true,
                Ok(n) => {
                    rest.advance(n);
                    s.front_started = n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    s.closed = true;
                    drop(s);
                    self.wake.notify_one();
                    return false;
                }
            }
        }
        s.bytes += rest.len();
        s.pending.push_back(rest);
        if s.bytes > self.max_bytes {
            s.overflow();
            drop(s);
            self.wake.notify_one();
            return false;
        }
        drop(s);
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// Writes queued bytes until the socket stops taking them; true when
    /// nothing is left.
    pub fn flush_pending(&self) -> io::Result<bool> {
        let mut s = self.lock();
        while let Some(front) = s.pending.front_mut() {
            match self.io.try_write(front) {
                Ok(n) if n == front.len() => {
                    s.pending.pop_front();
                    s.bytes -= n;
                    s.front_started = false;
                }
                Ok(n) => {
                    front.advance(n);
                    s.bytes -= n;
                    s.front_started = true;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    s.closed = true;
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    /// Resolves when the socket may take more bytes.
    pub async fn writable(&self) -> io::Result<()> {
        self.io.writable().await
    }

    pub fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    pub fn is_slow(&self) -> bool {
        self.lock().slow
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Asks the connection's task to end `channel`'s subscription and tell
    /// the client to resubscribe with recovery.
    pub fn resync(&self, channel: Arc<str>) {
        self.lock().resync.push(channel);
        self.wake.notify_one();
    }

    pub fn take_resync(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.lock().resync)
    }

    /// Marks the connection slow (a bound elsewhere, such as publications
    /// held during a subscribe, was passed).
    pub fn make_slow(&self) {
        let mut s = self.lock();
        if !s.slow {
            s.overflow();
        }
        drop(s);
        self.wake.notify_one();
    }

    /// The last frames: queued whatever the bound (after what a slow
    /// connection had queued was dropped), nothing more taken after them,
    /// and written within `wait`.
    pub async fn finish(&self, frames: Bytes, wait: Duration) {
        {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            s.closed = true;
            s.bytes += frames.len();
            s.pending.push_back(frames);
        }
        let written = async {
            loop {
                match self.flush_pending() {
                    Ok(true) | Err(_) => return,
                    Ok(false) => {
                        if self.io.writable().await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let _ = tokio::time::timeout(wait, written).await;
    }
}

/// What tungstenite reads from and writes its own replies (pong, close)
/// to: the socket's read half and the connection's [`Writer`]. Writes are
/// always taken whole, so a reply never splits around a publication.
pub struct ConnIo {
    read: OwnedReadHalf,
    writer: Arc<Writer>,
}

impl ConnIo {
    pub fn new(read: OwnedReadHalf, writer: Arc<Writer>) -> Self {
        Self { read, writer }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.writer.send(Bytes::copy_from_slice(buf)) {
            Poll::Ready(Ok(buf.len()))
        } else {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the connection is closing")))
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// Appends a server frame (final, unmasked) of `opcode` carrying `payload`.
fn put_frame(into: &mut BytesMut, opcode: u8, payload: &[u8]) {
    into.reserve(payload.len() + 10);
    into.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => into.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            into.put_u8(126);
            into.put_u16(n as u16);
        }
        n => {
            into.put_u8(127);
            into.put_u64(n as u64);
        }
    }
    into.put_slice(payload);
}

/// Appends a text frame.
pub fn put_text(into: &mut BytesMut, text: &str) {
    put_frame(into, TEXT, text.as_bytes());
}

/// A text frame.
pub fn text(text: &str) -> Bytes {
    let mut b = BytesMut::new();
    put_text(&mut b, text);
    b.freeze()
}

/// An empty ping frame.
pub fn ping() -> Bytes {
    Bytes::from_static(&[0x80 | PING, 0])
}

/// Appends a close frame with `code` and `reason` (cut to fit the 125 bytes
/// a control frame may carry).
pub fn put_close(into: &mut BytesMut, code: u16, reason: &str) {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    put_frame(into, CLOSE, &payload);
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};

    use super::*;

    /// tungstenite (what clients use) reads our frames back.
    fn parse(bytes: &[u8]) -> (FrameHeader, Vec<u8>) {
        let mut cursor = Cursor::new(bytes);
        let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        let start = cursor.position() as usize;
        assert_eq!(start as u64 + len, bytes.len() as u64, "one whole frame");
        (header, bytes[start..].to_vec())
    }

    #[test]
    fn frames_round_trip_through_tungstenite() {
        for n in [0, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let body = "x".repeat(n);
            let (header, payload) = parse(&text(&body));
            assert!(header.is_final && header.mask.is_none());
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            assert_eq!(payload.len(), n);
        }
        let (header, payload) = parse(&ping());
        assert_eq!((header.opcode, payload.len()), (OpCode::Control(Control::Ping), 0));
        let mut b = BytesMut::new();
        put_close(&mut b, 4001, &"é".repeat(100));
        let (header, payload) = parse(&b);
        assert_eq!(header.opcode, OpCode::Control(Control::Close));
        assert!(payload.len() <= 125);
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 4001);
        assert!(std::str::from_utf8(&payload[2..]).is_ok(), "the reason is cut on a character boundary");
    }

    async fn pair(max_bytes: usize) -> (Writer, OwnedReadHalf, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (read, write) = server.into_split();
        (Writer::new(write, max_bytes), read, client)
    }

    #[tokio::test]
    async fn a_socket_that_stops_reading_makes_the_writer_slow_but_keeps_frames_whole() {
        let (writer, _read, mut client) = pair(64 * 1024).await;
        let frame = text(&"y".repeat(1000));
        let mut sent = 0;
        while writer.send(frame.clone()) {
            sent += 1;
            assert!(sent < 100_000, "never slow");
        }
        assert!(writer.is_slow() && !writer.send(frame.clone()));
        let mut end = BytesMut::new();
        put_close(&mut end, 4001, "slow");
        let finish = writer.finish(end.freeze(), Duration::from_secs(10));
        // Read everything: whole frames only, the close frame last.
        let read = async {
            use tokio::io::AsyncReadExt as _;
            let mut all = Vec::new();
            let mut buf = vec![0; 1 << 16];
            loop {
                let n = client.read(&mut buf).await.unwrap();
                all.extend_from_slice(&buf[..n]);
                if all.ends_with(b"slow") {
                    return all;
                }
            }
        };
        let (_, all) = tokio::join!(finish, read);
        let mut at = 0;
        let mut frames = 0;
        let mut last = None;
        while at < all.len() {
            let mut cursor = Cursor::new(&all[at..]);
            let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            at += cursor.position() as usize + len as usize;
            frames += 1;
            last = Some(header.opcode);
        }
        assert_eq!(at, all.len());
        assert!(frames > 1 && frames <= sent + 1);
        assert_eq!(last, Some(OpCode::Control(Control::Close)));
    }
}
