/**
 * What a close code means for the client (docs/gateway-protocol.md, "Close
 * codes"): 4000–4499 reconnect, 4500–4999 stop (4502: get a new token
 * first), standard codes reconnect with backoff.
 */

export const CloseCodes = {
  Shutdown: 4000,
  Slow: 4001,
  PingTimeout: 4002,
  RateLimited: 4003,
  ConnectTimeout: 4004,
  ServerError: 4005,
  BadRequest: 4500,
  Unauthorized: 4501,
  TokenExpired: 4502,
  Forbidden: 4503,
  MessageTooBig: 4504,
} as const;

/** Codes the client itself reports when no server close frame says more. */
export const LocalCodes = {
  /** `disconnect()` was called. */
  Disconnected: 0,
  /** Nothing heard from the server within twice its ping interval. */
  NoPing: 1,
  /** No `connected` reply within `connectTimeoutMs`. */
  ConnectTimeout: 2,
  /** The browser reported it went offline. */
  Offline: 3,
  /** `getToken` rejected with `UnauthorizedError`. */
  Unauthorized: 4,
  /** A frame the client could not parse. */
  BadFrame: 5,
} as const;

/** What to do after a close. */
export type CloseAction =
  /** Reconnect after the advice or the backoff. */
  | "reconnect"
  /** Get a fresh token from `getToken`, then reconnect (4502). */
  | "refresh-token"
  /** Stay disconnected: retrying with the same request cannot succeed. */
  | "stop";

export function closeAction(code: number): CloseAction {
  if (code === CloseCodes.TokenExpired) return "refresh-token";
  if (code >= 4000 && code <= 4499) return "reconnect";
  if (code >= 4500 && code <= 4999) return "stop";
  // 1000 normal, 1001 going away, 1006 abnormal (also a refused upgrade:
  // HTTP 429/503), anything else: the connection ended without advice.
  return "reconnect";
}
