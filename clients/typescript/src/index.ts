/**
 * Herald's TypeScript client: `new Herald(url, { token | getToken })`,
 * `client.subscribe(channel, { onPublication, onRecovered, onReload })`,
 * `loadThenFollow`, presence. The protocol is docs/gateway-protocol.md.
 */
export { Herald, UnauthorizedError } from "./client.js";
export type { ClientEvents, ClientState, HeraldOptions, NetworkEvents, WebSocketConstructor, WebSocketLike } from "./client.js";
export { Subscription } from "./subscription.js";
export type {
  Publication,
  SubscribedContext,
  SubscriptionEvents,
  SubscriptionOptions,
  SubscriptionState,
  UnsubscribedContext,
} from "./subscription.js";
export { loadThenFollow } from "./follow.js";
export type { Follower, FollowOptions, Snapshot } from "./follow.js";
export { Backoff } from "./backoff.js";
export { CloseCodes, LocalCodes, closeAction } from "./codes.js";
export type { CloseAction } from "./codes.js";
export type { PresenceClient, StreamPosition } from "./protocol.js";
