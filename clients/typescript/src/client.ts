/**
 * The connection to a Herald gateway: connect with a token, keep the
 * subscriptions, reconnect by the protocol's rules and recover every
 * channel from its last position.
 *
 * States: `disconnected` → `connecting` (getting a token, opening, waiting
 * to retry) → `connected`. A close code of 4000–4499 or a standard code
 * reconnects (after the server's `reconnect_after_ms`, else a full-jitter
 * backoff); 4502 gets a fresh token first; other 4500–4999 codes stop.
 */
import { Backoff } from "./backoff.js";
import { closeAction, CloseCodes, LocalCodes } from "./codes.js";
import { Emitter } from "./emitter.js";
import type { Command, DisconnectPush, PresenceClient, PubPush, ServerFrame, SubscribedReply } from "./protocol.js";
import { parseFrame } from "./protocol.js";
import { Subscription, withTimeout } from "./subscription.js";
import type { SubscriptionHost, SubscriptionOptions } from "./subscription.js";
import { tokenExpiresAt } from "./token.js";

export type ClientState = "disconnected" | "connecting" | "connected";

/** The part of the WebSocket API the client uses (browsers' and `ws`'s). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** Thrown by `getToken` when the user is not allowed in: the client stops retrying. */
export class UnauthorizedError extends Error {
  constructor(message = "unauthorized") {
    super(message);
    this.name = "UnauthorizedError";
  }
}

/** An event target with `online`/`offline` events (the browser's `window`). */
export interface NetworkEvents {
  addEventListener(type: "online" | "offline", listener: () => void): void;
  removeEventListener(type: "online" | "offline", listener: () => void): void;
}

export interface HeraldOptions {
  /** A client token (JWT). Without `getToken`, a 4502 close stops the client. */
  token?: string;
  /** Called whenever a token is needed: at the first connect, when the token has expired, after a 4502. */
  getToken?: () => Promise<string>;
  /** The WebSocket class: the global one by default; in Node 20 pass `ws`. */
  websocket?: WebSocketConstructor;
  /** First backoff ceiling (the n-th retry waits up to `min(max, min · 2^n)`). */
  minReconnectDelayMs?: number;
  maxReconnectDelayMs?: number;
  /** Time for the socket to open and the gateway to answer `connect`. */
  connectTimeoutMs?: number;
  /** Send an application ping after this much idle time (default: the server's `ping_interval_ms`). */
  pingIntervalMs?: number;
  /** Where `online`/`offline` events come from (default: `window` in a browser; `null`: none). */
  network?: NetworkEvents | null;
  /** Random numbers in [0, 1) for the backoff's jitter. */
  random?: () => number;
}

export interface ClientEvents {
  state: { previous: ClientState; state: ClientState };
  connecting: { code: number; reason: string };
  connected: { client: string };
  disconnected: { code: number; reason: string };
  error: { type: string; error: Error };
}

interface Pending {
  resolve: (frame: ServerFrame) => void;
  reject: (error: Error) => void;
  subscription?: Subscription;
}

const OPEN = 1;

export class Herald extends Emitter<ClientEvents> implements SubscriptionHost {
  private currentState: ClientState = "disconnected";
  private readonly subs = new Map<string, Subscription>();
  private readonly backoff: Backoff;
  private readonly WS: WebSocketConstructor;
  private ws: WebSocketLike | undefined;
  /** Bumped on every connection attempt; callbacks of an older one are ignored. */
  private generation = 0;
  private nextId = 1;
  private pending = new Map<number, Pending>();
  private token: string | undefined;
  private advice: DisconnectPush | undefined;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private livenessTimer: ReturnType<typeof setInterval> | undefined;
  private lastReceived = 0;
  private lastSent = 0;
  private offline = false;
  private readyWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private clientId: string | undefined;
  private readonly network: NetworkEvents | null;
  private readonly onOnline = () => this.wentOnline();
  private readonly onOffline = () => this.wentOffline();

  constructor(
    readonly url: string,
    private readonly options: HeraldOptions = {},
  ) {
    super();
    if (!options.token && !options.getToken) throw new Error("Herald: give a token or getToken");
    this.token = options.token;
    this.backoff = new Backoff(options.minReconnectDelayMs ?? 500, options.maxReconnectDelayMs ?? 20_000, options.random);
    const WS = options.websocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new Error("Herald: no global WebSocket; pass the `ws` package as options.websocket");
    this.WS = WS;
    this.network = options.network !== undefined ? options.network : browserNetwork();
  }

  get state(): ClientState {
    return this.currentState;
  }

  /** The gateway's id of this connection while connected. */
  get client(): string | undefined {
    return this.clientId;
  }

  /** Starts connecting (and keeps reconnecting) until `disconnect()`. */
  connect(): void {
    if (this.currentState !== "disconnected") return;
    this.network?.addEventListener("online", this.onOnline);
    this.network?.addEventListener("offline", this.onOffline);
    this.backoff.reset();
    this.setState("connecting");
    void this.attempt();
  }

  /** Closes the connection and stops reconnecting; subscriptions are kept for a later `connect()`. */
  disconnect(): void {
    if (this.currentState === "disconnected") return;
    this.stop(LocalCodes.Disconnected, "disconnect called");
  }

  /** Resolves once connected; rejects if the client stops first (or after `timeoutMs`). */
  ready(timeoutMs?: number): Promise<void> {
    if (this.currentState === "connected") return Promise.resolve();
    if (this.currentState === "disconnected") return Promise.reject(new Error("Herald: disconnected"));
    return withTimeout(
      new Promise<void>((resolve, reject) => this.readyWaiters.push({ resolve, reject })),
      timeoutMs,
      `Herald: not connected within ${timeoutMs} ms`,
    );
  }

  /**
   * Subscribes to `channel` (now, or as soon as connected) and keeps it
   * subscribed across reconnects, recovering what was missed.
   */
  subscribe<T = unknown>(channel: string, options: SubscriptionOptions<T> = {}): Subscription<T> {
    if (this.subs.has(channel)) throw new Error(`Herald: already subscribed to ${channel}`);
    const sub = new Subscription<T>(channel, this, options);
    this.subs.set(channel, sub as Subscription<unknown>);
    sub.startSubscribing();
    if (this.currentState === "connected") this.sendSubscribe(sub);
    return sub;
  }

  getSubscription(channel: string): Subscription | undefined {
    return this.subs.get(channel);
  }

  /** Who is subscribed to `channel` across the gateways. */
  async presence(channel: string, timeoutMs = 10_000): Promise<PresenceClient[]> {
    await this.ready(timeoutMs);
    const reply = await withTimeout(this.request({ type: "presence", id: 0, channel }), timeoutMs, "presence timed out");
    if (reply.type !== "presence") throw new Error(`Herald: unexpected reply ${reply.type}`);
    return reply.clients;
  }

  /** Round trip to the gateway, milliseconds. */
  async ping(timeoutMs = 10_000): Promise<number> {
    await this.ready(timeoutMs);
    const started = Date.now();
    await withTimeout(this.request({ type: "ping", id: 0 }), timeoutMs, "ping timed out");
    return Date.now() - started;
  }

  // ---- SubscriptionHost -------------------------------------------------

  sendSubscribe<T>(sub: Subscription<T>): void {
    if (this.currentState !== "connected") return;
    const id = this.nextId++;
    const recover = sub.recoverFrom();
    sub.recovering = recover !== undefined;
    sub.pendingSubscribeId = id;
    sub.sentOnConnection = true;
    this.pending.set(id, { resolve: () => {}, reject: () => {}, subscription: sub as Subscription<unknown> });
    this.send(recover ? { type: "subscribe", id, channel: sub.channel, recover } : { type: "subscribe", id, channel: sub.channel });
  }

  sendUnsubscribe<T>(sub: Subscription<T>): void {
    if (this.currentState !== "connected") return;
    // The reply carries this id and is ignored; a later subscription of the
    // same channel waits for its own subscribe's id.
    this.send({ type: "unsubscribe", id: this.nextId++, channel: sub.channel });
  }

  removeSubscription<T>(sub: Subscription<T>): void {
    if ((this.subs.get(sub.channel) as unknown) === sub) this.subs.delete(sub.channel);
  }

  // ---- connection -------------------------------------------------------

  private async attempt(): Promise<void> {
    const generation = ++this.generation;
    this.reconnectTimer = undefined;
    if (this.offline) return; // wentOnline() starts the next attempt
    let token: string;
    try {
      token = await this.currentToken();
    } catch (error) {
      if (generation !== this.generation) return;
      const err = error instanceof Error ? error : new Error(String(error));
      this.emit("error", { type: "token", error: err });
      if (error instanceof UnauthorizedError) {
        this.stop(LocalCodes.Unauthorized, err.message);
      } else {
        this.retry(LocalCodes.Unauthorized, `getToken failed: ${err.message}`, undefined);
      }
      return;
    }
    if (generation !== this.generation || this.currentState !== "connecting") return;
    let ws: WebSocketLike;
    try {
      ws = new this.WS(this.url);
    } catch (error) {
      this.retry(1006, `cannot open: ${String(error)}`, undefined);
      return;
    }
    this.ws = ws;
    this.advice = undefined;
    const connectTimeout = this.options.connectTimeoutMs ?? 10_000;
    this.connectTimer = setTimeout(() => {
      if (generation === this.generation) this.lost(LocalCodes.ConnectTimeout, "connect timed out");
    }, connectTimeout);
    let upgradeError: string | undefined;
    ws.onopen = () => {
      if (generation !== this.generation) return;
      this.send({ type: "connect", id: 0, token });
    };
    ws.onmessage = (event) => {
      if (generation !== this.generation) return;
      this.lastReceived = Date.now();
      const text = typeof event.data === "string" ? event.data : decodeText(event.data);
      const frame = text === undefined ? undefined : parseFrame(text);
      if (!frame) {
        this.emit("error", { type: "frame", error: new Error("unparseable frame from the gateway") });
        return;
      }
      this.onFrame(frame);
    };
    ws.onerror = (event) => {
      // `ws` reports a refused upgrade (HTTP 429/503) here; the close that
      // follows is 1006 and retries with backoff, as the protocol asks.
      const message = (event as { message?: unknown }).message;
      if (typeof message === "string") upgradeError = message;
    };
    ws.onclose = (event) => {
      if (generation !== this.generation) return;
      this.onClose(event.code, upgradeError ?? event.reason);
    };
  }

  private async currentToken(): Promise<string> {
    const fresh = this.token !== undefined && !expired(this.token);
    if (fresh) return this.token as string;
    if (!this.options.getToken) {
      if (this.token !== undefined) return this.token; // the server will say 4502
      throw new UnauthorizedError("no token");
    }
    const token = await this.options.getToken();
    if (!token) throw new UnauthorizedError("getToken returned no token");
    this.token = token;
    return token;
  }

  private onFrame(frame: ServerFrame): void {
    switch (frame.type) {
      case "connected":
        this.onConnected(frame.client, frame.ping_interval_ms);
        return;
      case "pub":
        this.onPub(frame);
        return;
      case "subscribed":
        this.onSubscribed(frame);
        return;
      case "unsubscribed": {
        if (frame.id !== undefined) return; // the reply to our unsubscribe
        const sub = this.subs.get(frame.channel);
        if (sub && sub.onServerUnsubscribed(frame)) this.sendSubscribe(sub);
        return;
      }
      case "disconnect":
        this.advice = frame;
        return;
      case "error": {
        const pending = frame.id !== undefined ? this.pending.get(frame.id) : undefined;
        if (frame.id !== undefined) this.pending.delete(frame.id);
        const sub = pending?.subscription;
        if (sub) {
          if (sub.pendingSubscribeId === frame.id && sub.onSubscribeError(frame.code, frame.message)) {
            this.retrySubscribe(sub);
          }
          return;
        }
        if (pending) pending.reject(new Error(`Herald: ${frame.code} ${frame.message}`));
        else this.emit("error", { type: "server", error: new Error(`${frame.code} ${frame.message}`) });
        return;
      }
      case "presence":
      case "pong": {
        const pending = frame.id !== undefined ? this.pending.get(frame.id) : undefined;
        if (frame.id !== undefined) this.pending.delete(frame.id);
        pending?.resolve(frame);
        return;
      }
    }
  }

  private onConnected(client: string, serverPingMs: number): void {
    this.clearConnectTimer();
    this.clientId = client;
    this.backoff.reset();
    this.setState("connected");
    this.startLiveness(serverPingMs);
    for (const waiter of this.readyWaiters.splice(0)) waiter.resolve();
    this.emit("connected", { client });
    for (const sub of this.subs.values()) {
      if (sub.state !== "unsubscribed" && !sub.sentOnConnection) this.sendSubscribe(sub);
    }
  }

  private onSubscribed(reply: SubscribedReply): void {
    if (reply.id !== undefined) this.pending.delete(reply.id);
    const sub = this.subs.get(reply.channel);
    // Only the reply to this subscription's own subscribe counts: one to an
    // earlier subscribe of the same channel (since unsubscribed) does not.
    if (!sub || reply.id === undefined || sub.pendingSubscribeId !== reply.id) return;
    sub.onSubscribed(reply);
  }

  private onPub(pub: PubPush): void {
    const sub = this.subs.get(pub.channel);
    if (!sub) return;
    switch (sub.verdict(pub)) {
      case "deliver":
        sub.deliver(pub);
        return;
      case "drop":
        return;
      case "gap":
        // The server fills gaps itself; if one still shows, recover from
        // the last position rather than skip.
        sub.startSubscribing();
        this.sendUnsubscribe(sub);
        this.sendSubscribe(sub);
        return;
    }
  }

  private retrySubscribe(sub: Subscription): void {
    sub.clearRetry();
    const delay = Math.floor((this.options.random ?? Math.random)() * 1000) + 250;
    sub.retryTimer = setTimeout(() => {
      sub.retryTimer = undefined;
      if (this.subs.get(sub.channel) === sub && sub.state === "subscribing" && !sub.sentOnConnection) {
        this.sendSubscribe(sub);
      }
    }, delay);
  }

  private onClose(code: number, reason: string): void {
    const advice = this.advice;
    // The disconnect frame names the code even when the close frame was lost.
    const effective = code === 1006 && advice ? advice.code : code;
    switch (closeAction(effective)) {
      case "stop":
        this.stop(effective, advice?.reason ?? reason);
        return;
      case "refresh-token":
        if (!this.options.getToken) {
          this.stop(effective, "token expired and no getToken to renew it");
          return;
        }
        // The next attempt calls getToken; the backoff keeps a getToken that
        // hands out expired tokens from spinning.
        this.token = undefined;
        this.retry(effective, advice?.reason ?? reason, undefined);
        return;
      case "reconnect":
        this.retry(effective, advice?.reason ?? reason, advice?.reconnect_after_ms);
        return;
    }
  }

  /** The connection is gone from our side (timeout, no pings): close it and retry. */
  private lost(code: number, reason: string): void {
    const ws = this.ws;
    this.generation++;
    try {
      ws?.close(1000, reason);
    } catch {
      // already closed
    }
    this.retry(code, reason, undefined);
  }

  private retry(code: number, reason: string, delayMs: number | undefined): void {
    this.teardown(reason);
    this.setState("connecting");
    this.emit("connecting", { code, reason });
    const delay = delayMs ?? this.backoff.next();
    this.reconnectTimer = setTimeout(() => void this.attempt(), delay);
  }

  private stop(code: number, reason: string): void {
    const ws = this.ws;
    this.generation++;
    if (ws && ws.readyState <= OPEN) {
      try {
        ws.close(1000, reason);
      } catch {
        // already closing
      }
    }
    this.teardown(reason);
    this.network?.removeEventListener("online", this.onOnline);
    this.network?.removeEventListener("offline", this.onOffline);
    this.setState("disconnected");
    for (const waiter of this.readyWaiters.splice(0)) waiter.reject(new Error(`Herald: ${reason}`));
    for (const sub of this.subs.values()) sub.onClientStopped(reason);
    this.emit("disconnected", { code, reason });
  }

  /** Forgets the socket, its timers and its requests; subscriptions wait for the next connection. */
  private teardown(reason: string): void {
    if (this.ws) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = this.ws.onerror = null;
    }
    this.ws = undefined;
    this.clientId = undefined;
    this.clearConnectTimer();
    if (this.reconnectTimer !== undefined) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    if (this.livenessTimer !== undefined) clearInterval(this.livenessTimer);
    this.livenessTimer = undefined;
    for (const pending of this.pending.values()) pending.reject(new Error(`Herald: connection closed (${reason})`));
    this.pending.clear();
    for (const sub of this.subs.values()) {
      sub.clearRetry();
      sub.onConnectionLost();
    }
  }

  private startLiveness(serverPingMs: number): void {
    const interval = Math.max(1, Math.min(this.options.pingIntervalMs ?? serverPingMs, serverPingMs));
    const generation = this.generation;
    this.lastReceived = Date.now();
    this.lastSent = Date.now();
    this.livenessTimer = setInterval(() => {
      if (generation !== this.generation) return;
      const now = Date.now();
      // The protocol: silence for twice the ping interval means a dead connection.
      if (now - this.lastReceived > 2 * serverPingMs) {
        this.lost(LocalCodes.NoPing, "no frame from the gateway within twice its ping interval");
        return;
      }
      // Browsers cannot see WebSocket pings: an application ping gets a pong back.
      if (now - this.lastSent >= interval || now - this.lastReceived >= interval) {
        this.send({ type: "ping", id: this.nextId++ });
      }
    }, Math.max(1, Math.floor(interval / 2)));
  }

  private wentOffline(): void {
    if (this.currentState === "disconnected") return;
    this.offline = true;
    this.generation++;
    try {
      this.ws?.close(1000, "offline");
    } catch {
      // already closed
    }
    this.teardown("offline");
    this.setState("connecting");
    this.emit("connecting", { code: LocalCodes.Offline, reason: "offline" });
  }

  private wentOnline(): void {
    if (!this.offline) return;
    this.offline = false;
    if (this.currentState !== "connecting") return;
    if (this.reconnectTimer !== undefined) clearTimeout(this.reconnectTimer);
    this.backoff.reset();
    void this.attempt();
  }

  private request(command: Command): Promise<ServerFrame> {
    const id = this.nextId++;
    return new Promise<ServerFrame>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.send({ ...command, id });
    });
  }

  private send(command: Command): void {
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN) return;
    this.lastSent = Date.now();
    ws.send(JSON.stringify(command));
  }

  private clearConnectTimer(): void {
    if (this.connectTimer !== undefined) clearTimeout(this.connectTimer);
    this.connectTimer = undefined;
  }

  private setState(state: ClientState): void {
    if (state === this.currentState) return;
    const previous = this.currentState;
    this.currentState = state;
    this.emit("state", { previous, state });
  }
}

/** A token whose `exp` has passed (with a second of margin) is not sent. */
function expired(token: string): boolean {
  const exp = tokenExpiresAt(token);
  return exp !== undefined && exp * 1000 <= Date.now() + 1000;
}

function decodeText(data: unknown): string | undefined {
  if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) {
    return new TextDecoder().decode(data as ArrayBuffer);
  }
  return undefined;
}

function browserNetwork(): NetworkEvents | null {
  const g = globalThis as { window?: NetworkEvents; navigator?: { onLine?: boolean } };
  return g.window && typeof g.window.addEventListener === "function" ? g.window : null;
}

export { CloseCodes, LocalCodes };
