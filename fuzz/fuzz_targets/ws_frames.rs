//! WebSocket client frames and the JSON protocol: bytes a client sends after
//! the upgrade, read by tungstenite with the gateway's configuration
//! (services/gateway/src/conn.rs), then every text frame parsed as a client
//! command and its channel name and recovery position checked as the
//! connection does.
#![no_main]

use std::io::{self, Cursor, Read, Write};

use herald_core::channel::Channel;
use herald_core::config::GatewayConfig;
use herald_gateway::protocol::{ClientFrame, Positions, check_data};
use libfuzzer_sys::fuzz_target;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error, Message};

/// The client's bytes in; whatever the server writes back goes nowhere.
struct Client(Cursor<Vec<u8>>);

impl Read for Client {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Client {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn command(text: &str) {
    let frame = match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => frame,
        Err(_) => return,
    };
    match frame {
        ClientFrame::Connect { token, .. } => {
            let _ = token.len();
        }
        ClientFrame::Subscribe { channel, recover, .. } => {
            if let Ok(parsed) = Channel::parse(&channel) {
                assert_eq!(format!("{}:{}", parsed.namespace(), parsed.id()), channel);
            }
            if let Some(position) = recover {
                let _ = position.epoch.len();
            }
        }
        ClientFrame::Unsubscribe { channel, .. } | ClientFrame::Presence { channel, .. } => {
            let _ = Channel::parse(&channel);
        }
        ClientFrame::Ping { .. } => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let max = GatewayConfig::default().limits.max_frame_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(2048)
        .write_buffer_size(0)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let mut ws = WebSocket::from_raw_socket(Client(Cursor::new(data.to_vec())), Role::Server, Some(config));
    // Bounded: every read consumes input or ends the loop.
    for _ in 0..data.len() + 2 {
        match ws.read() {
            Ok(Message::Text(text)) => {
                assert!(text.len() <= max);
                command(text.as_str());
                let _ = serde_json::from_str::<Positions>(text.as_str());
            }
            Ok(Message::Binary(bytes)) => {
                if let Ok(text) = check_data(&bytes, max) {
                    assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());
                }
            }
            Ok(_) => {}
            Err(Error::Io(_) | Error::ConnectionClosed | Error::AlreadyClosed) => break,
            Err(_) => break,
        }
    }
    // The text path also on the raw bytes, without framing.
    if let Ok(text) = std::str::from_utf8(data) {
        command(text);
    }
});
