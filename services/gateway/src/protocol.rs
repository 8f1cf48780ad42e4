//! The WebSocket protocol: JSON frames in both directions and the close
//! codes. `docs/gateway-protocol.md` is the reference for client authors;
//! keep the two in step.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Close codes. 4000–4499: the client should reconnect (with backoff);
/// 4500–4999: it must not reconnect with the same token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// The node is shutting down; reconnect (to another node) after the
    /// advised delay.
    Shutdown = 4000,
    /// The client read too slowly and its queue overflowed.
    Slow = 4001,
    /// No frame (not even a pong) within the ping timeout.
    PingTimeout = 4002,
    /// Too many commands on this connection, or for this tenant.
    RateLimited = 4003,
    /// No `connect` frame within the connect timeout.
    ConnectTimeout = 4004,
    /// An internal error; reconnect.
    ServerError = 4005,
    /// A frame that is not valid JSON or not a known command.
    BadRequest = 4500,
    /// Missing, malformed, unsigned or wrongly signed token, or unknown `kid`.
    Unauthorized = 4501,
    /// The token has expired: get a new one, then reconnect.
    TokenExpired = 4502,
    /// The token is valid but names no usable tenant.
    Forbidden = 4503,
    /// A frame over the size limit.
    MessageTooBig = 4504,
}

impl CloseCode {
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Shutdown => "shutdown",
            CloseCode::Slow => "slow",
            CloseCode::PingTimeout => "ping timeout",
            CloseCode::RateLimited => "rate limited",
            CloseCode::ConnectTimeout => "connect timeout",
            CloseCode::ServerError => "server error",
            CloseCode::BadRequest => "bad request",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::TokenExpired => "token expired",
            CloseCode::Forbidden => "forbidden",
            CloseCode::MessageTooBig => "message too big",
        }
    }

    /// Whether a client may reconnect after this close.
    pub fn reconnect(self) -> bool {
        (self as u16) < 4500
    }
}

/// Where a reconnecting client was in a channel.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// What a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    Connect {
        #[serde(default)]
        id: Option<u64>,
        token: String,
    },
    Subscribe {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
        #[serde(default)]
        recover: Option<Position>,
    },
    Unsubscribe {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
    },
    Presence {
        #[serde(default)]
        id: Option<u64>,
        channel: String,
    },
    Ping {
        #[serde(default)]
        id: Option<u64>,
    },
}

/// Replies and pushes, as JSON text.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Connected {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        client: &'a str,
        ping_interval_ms: u64,
    },
    Subscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: &'a str,
        /// The position the client may store now: where a recovery replay
        /// starts (each replayed `pub` then moves it), else `head`.
        offset: u64,
        epoch: &'a str,
        /// The channel's latest offset: a recovery replay ends there.
        head: u64,
        /// Present when the client asked to recover.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// Publications that follow this frame (the recovered ones).
        missed: usize,
        /// Redis was unreachable: live delivery from this node only, no
        /// history and no recovery.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        degraded: bool,
    },
    Unsubscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        /// The server ended the subscription; subscribe again with `recover`.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        resubscribe: bool,
    },
    Presence {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: &'a str,
        clients: Vec<serde_json::Value>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: u16,
        message: &'a str,
    },
    Disconnect {
        code: u16,
        reason: &'a str,
        reconnect: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        reconnect_after_ms: Option<u64>,
    },
}

impl ServerFrame<'_> {
    pub fn text(&self) -> String {
        serde_json::to_string(self).expect("server frames serialize")
    }
}

/// A publication frame, built once per publication and shared by every
/// subscriber: `{"type":"pub","channel":…,"offset":…,"epoch":…,"data":…}`.
/// `data` must be JSON text; channel and epoch contain no characters that
/// need escaping (they are validated).
pub fn publication_frame(channel: &str, offset: u64, epoch: &str, data: &str) -> String {
    format!(r#"{{"type":"pub","channel":"{channel}","offset":{offset},"epoch":"{epoch}","data":{data}}}"#)
}

/// Checks that `data` is one JSON value (numbers within a double's range)
/// and at most `max` bytes.
pub fn check_data(data: &[u8], max: usize) -> Result<&str, String> {
    if data.len() > max {
        return Err(format!("data is {} bytes, the limit is {max}", data.len()));
    }
    let text = std::str::from_utf8(data).map_err(|_| "data is not UTF-8".to_string())?;
    // Parsed as a `Value`, not skipped: that also refuses numbers outside a
    // double's range, which clients that read numbers as doubles cannot parse.
    serde_json::from_str::<serde_json::Value>(text).map_err(|e| format!("data is not one JSON value: {e}"))?;
    Ok(text)
}

/// Positions a client sends at connect, by channel (unused fields ignored).
pub type Positions = HashMap<String, Position>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_and_render() {
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"subscribe","id":2,"channel":"team:1","recover":{"offset":3,"epoch":"e"}}"#,
        )
        .unwrap();
        assert!(matches!(f, ClientFrame::Subscribe { id: Some(2), recover: Some(Position { offset: 3, .. }), .. }));
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"launch"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"ping","extra":1}"#).is_err());
        let text = publication_frame("team:1", 7, "ab", r#"{"a":1}"#);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["offset"], 7);
        assert_eq!(v["data"]["a"], 1);
        assert!(CloseCode::Slow.reconnect());
        assert!(!CloseCode::TokenExpired.reconnect());
    }

    proptest::proptest! {
        // Frames from outside never panic the parser, and a publication
        // frame built from checked data is always valid JSON.
        #[test]
        fn parsing_never_panics(text in "\\PC{0,200}", data in "\\PC{0,64}") {
            let _ = serde_json::from_str::<ClientFrame>(&text);
            if let Ok(data) = check_data(data.as_bytes(), 1024) {
                let frame = publication_frame("team:1", 1, "ab", data);
                proptest::prop_assert!(serde_json::from_str::<serde_json::Value>(&frame).is_ok());
            }
        }
    }

    #[test]
    fn data_numbers_fit_a_double() {
        // Found by `make fuzz` (ws_frames): 813E770 is JSON by the grammar,
        // but a client parsing numbers as doubles (serde_json) cannot read
        // a publication frame that carries it.
        assert!(check_data(b"813E770", 100).is_err());
        assert!(check_data(b"[1e309]", 100).is_err());
        assert!(check_data(b"[1e308, -2.5, 18446744073709551615]", 100).is_ok());
    }

    #[test]
    fn data_is_checked() {
        assert!(check_data(b"{\"a\":1}", 100).is_ok());
        assert!(check_data(b"{\"a\":", 100).is_err());
        assert!(check_data(b"1 2", 100).is_err());
        assert!(check_data(&[b'1'; 20], 10).is_err());
    }
}
