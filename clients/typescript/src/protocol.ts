/**
 * The frames of Herald's gateway protocol (docs/gateway-protocol.md), as
 * TypeScript types. Every frame is one JSON object in a text frame.
 */

/** A position in a channel: everything up to `offset` of `epoch` was received. */
export interface StreamPosition {
  offset: number;
  epoch: string;
}

export type Command =
  | { type: "connect"; id: number; token: string }
  | { type: "subscribe"; id: number; channel: string; recover?: StreamPosition }
  | { type: "unsubscribe"; id: number; channel: string }
  | { type: "presence"; id: number; channel: string }
  | { type: "ping"; id: number };

export interface ConnectedReply {
  type: "connected";
  id?: number;
  client: string;
  ping_interval_ms: number;
}

export interface SubscribedReply {
  type: "subscribed";
  id?: number;
  channel: string;
  offset: number;
  epoch: string;
  head?: number;
  missed?: number;
  recovered?: boolean;
  degraded?: boolean;
}

export interface PubPush {
  type: "pub";
  channel: string;
  offset: number;
  epoch: string;
  data: unknown;
}

export interface UnsubscribedFrame {
  type: "unsubscribed";
  id?: number;
  channel: string;
  reason?: string;
  resubscribe?: boolean;
}

export interface PresenceClient {
  client: string;
  user: string;
}

export interface PresenceReply {
  type: "presence";
  id?: number;
  channel: string;
  clients: PresenceClient[];
}

export interface ErrorReply {
  type: "error";
  id?: number;
  code: number;
  message: string;
}

export interface DisconnectPush {
  type: "disconnect";
  code: number;
  reason: string;
  reconnect: boolean;
  reconnect_after_ms?: number;
}

export interface PongReply {
  type: "pong";
  id?: number;
}

export type ServerFrame =
  | ConnectedReply
  | SubscribedReply
  | PubPush
  | UnsubscribedFrame
  | PresenceReply
  | ErrorReply
  | DisconnectPush
  | PongReply;

/** Parses one text frame; `undefined` for anything that is not a known frame. */
export function parseFrame(text: string): ServerFrame | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null) return undefined;
  const type = (value as { type?: unknown }).type;
  switch (type) {
    case "connected":
    case "subscribed":
    case "pub":
    case "unsubscribed":
    case "presence":
    case "error":
    case "disconnect":
    case "pong":
      return value as ServerFrame;
    default:
      return undefined;
  }
}
