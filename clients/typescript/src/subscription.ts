/**
 * One channel subscription: its state, its position (offset, epoch), and the
 * client-side checks on every publication (a duplicate is dropped, a gap
 * asks the client to recover, a new epoch at offset 1 is not a loss).
 */
import { Emitter } from "./emitter.js";
import type { PubPush, StreamPosition, SubscribedReply, UnsubscribedFrame } from "./protocol.js";

export type SubscriptionState = "unsubscribed" | "subscribing" | "subscribed";

/** A publication as the application sees it. */
export interface Publication<T = unknown> {
  channel: string;
  data: T;
  /** 0 for a publication delivered while the gateway could not reach Redis. */
  offset: number;
  epoch: string;
  /** Delivered by recovery after a reconnect (it was published while this client was away). */
  recovered: boolean;
}

export interface SubscribedContext {
  channel: string;
  /** This subscribe asked to recover from an earlier position. */
  wasRecovering: boolean;
  /** The server gave exactly everything after that position. */
  recovered: boolean;
  /** Publications the server replays after this reply. */
  missed: number;
  /** Redis is down on the gateway: live publications of that node only, no history. */
  degraded: boolean;
  position: StreamPosition;
}

export interface UnsubscribedContext {
  channel: string;
  /** A gateway error code (403, 404, …) or 0 when the application unsubscribed. */
  code: number;
  reason: string;
}

export interface SubscriptionEvents {
  state: { channel: string; previous: SubscriptionState; state: SubscriptionState };
  subscribed: SubscribedContext;
  publication: Publication;
  recovered: SubscribedContext;
  reload: SubscribedContext;
  unsubscribed: UnsubscribedContext;
  error: { channel: string; code: number; message: string };
}

export interface SubscriptionOptions<T = unknown> {
  /** Start from a stored position (recover what was published since). */
  position?: StreamPosition;
  onPublication?: (publication: Publication<T>) => void;
  /** A resubscribe got everything missed; the missed publications follow through `onPublication`. */
  onRecovered?: (context: SubscribedContext) => void;
  /** History could not fill what was missed: re-fetch the channel's state from your API. */
  onReload?: (context: SubscribedContext) => void;
  onSubscribed?: (context: SubscribedContext) => void;
  onUnsubscribed?: (context: UnsubscribedContext) => void;
  onError?: (error: { channel: string; code: number; message: string }) => void;
}

/** What to do with a publication. */
export type PubVerdict = "deliver" | "drop" | "gap";

/** The hooks a subscription needs from its client. */
export interface SubscriptionHost {
  sendSubscribe<T>(sub: Subscription<T>): void;
  sendUnsubscribe<T>(sub: Subscription<T>): void;
  removeSubscription<T>(sub: Subscription<T>): void;
}

export class Subscription<T = unknown> extends Emitter<SubscriptionEvents> {
  private currentState: SubscriptionState = "unsubscribed";
  private pos: StreamPosition | undefined;
  /** After a recovered subscribe: publications up to here are the replay. */
  private replayHead = 0;
  private isDegraded = false;
  private readyWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  /** The id of the subscribe command awaiting its reply on the current connection. */
  pendingSubscribeId: number | undefined;
  /** Whether the server holds this subscription on the current connection. */
  sentOnConnection = false;
  /** Set when the last subscribe asked to recover. */
  recovering = false;
  retryTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    readonly channel: string,
    private readonly host: SubscriptionHost,
    private readonly options: SubscriptionOptions<T> = {},
  ) {
    super();
    this.pos = options.position ? { ...options.position } : undefined;
  }

  get state(): SubscriptionState {
    return this.currentState;
  }

  /** Everything up to this position was received; store it to resume later. */
  get position(): StreamPosition | undefined {
    return this.pos ? { ...this.pos } : undefined;
  }

  get degraded(): boolean {
    return this.isDegraded;
  }

  /** Resolves once subscribed; rejects if the subscription ends first. */
  ready(timeoutMs?: number): Promise<void> {
    if (this.currentState === "subscribed") return Promise.resolve();
    if (this.currentState === "unsubscribed") return Promise.reject(new Error(`${this.channel}: unsubscribed`));
    return withTimeout(
      new Promise<void>((resolve, reject) => this.readyWaiters.push({ resolve, reject })),
      timeoutMs,
      `${this.channel}: not subscribed within ${timeoutMs} ms`,
    );
  }

  /** Stops the subscription (and never resubscribes it on a reconnect). */
  unsubscribe(): void {
    if (this.currentState === "unsubscribed") return;
    this.clearRetry();
    if (this.sentOnConnection) this.host.sendUnsubscribe(this);
    this.sentOnConnection = false;
    this.pendingSubscribeId = undefined;
    this.host.removeSubscription(this);
    this.end({ channel: this.channel, code: 0, reason: "unsubscribe called" });
  }

  // ---- called by the client -------------------------------------------

  /** The `recover` field of the next subscribe. */
  recoverFrom(): StreamPosition | undefined {
    return this.pos ? { ...this.pos } : undefined;
  }

  /** Marks the subscription as (re)subscribing; the client sends the command. */
  startSubscribing(): void {
    this.isDegraded = false;
    this.setState("subscribing");
  }

  onSubscribed(reply: SubscribedReply): void {
    this.pendingSubscribeId = undefined;
    const wasRecovering = this.recovering;
    // A channel that had no state then and has none now: nothing was missed.
    const stillEmpty = this.pos?.epoch === "" && reply.epoch === "" && reply.offset === 0;
    const recovered = wasRecovering && (reply.recovered === true || (stillEmpty && reply.degraded !== true));
    this.isDegraded = reply.degraded === true;
    // Degraded without a position: the resubscribe that follows Redis's
    // return must still recover (from "nothing"), so what was published in
    // between is reported (onReload) rather than skipped.
    if (this.isDegraded && !this.pos) this.pos = { offset: 0, epoch: "" };
    if (!this.isDegraded) {
      // Always a position we may store (the protocol guarantees it).
      this.pos = { offset: reply.offset, epoch: reply.epoch };
      this.replayHead = recovered ? (reply.head ?? reply.offset) : 0;
    }
    const context: SubscribedContext = {
      channel: this.channel,
      wasRecovering,
      recovered,
      missed: reply.missed ?? 0,
      degraded: this.isDegraded,
      position: { offset: reply.offset, epoch: reply.epoch },
    };
    this.setState("subscribed");
    for (const waiter of this.readyWaiters.splice(0)) waiter.resolve();
    this.emit("subscribed", context);
    this.options.onSubscribed?.(context);
    if (wasRecovering && !this.isDegraded) {
      if (recovered) {
        this.emit("recovered", context);
        this.options.onRecovered?.(context);
      } else {
        this.emit("reload", context);
        this.options.onReload?.(context);
      }
    }
  }

  /** Checks a publication against the position. */
  verdict(pub: PubPush): PubVerdict {
    if (this.currentState !== "subscribed") return "drop";
    if (pub.offset === 0) return "deliver"; // degraded delivery: no position
    const pos = this.pos;
    if (!pos) return "deliver";
    if (pub.epoch === pos.epoch) {
      if (pub.offset <= pos.offset) return "drop";
      if (pub.offset === pos.offset + 1) return "deliver";
      return "gap";
    }
    // A new epoch starting at 1: the channel's state expired, nothing was missed.
    return pub.offset === 1 ? "deliver" : "gap";
  }

  /** Applies a publication the verdict said to deliver. */
  deliver(pub: PubPush): void {
    const recovered = pub.offset !== 0 && pub.epoch === this.pos?.epoch && pub.offset <= this.replayHead;
    if (pub.offset !== 0) this.pos = { offset: pub.offset, epoch: pub.epoch };
    const publication: Publication<T> = {
      channel: this.channel,
      data: pub.data as T,
      offset: pub.offset,
      epoch: pub.epoch,
      recovered,
    };
    this.emit("publication", publication);
    this.options.onPublication?.(publication);
  }

  /** The server ended the subscription. Returns whether to subscribe again. */
  onServerUnsubscribed(frame: UnsubscribedFrame): boolean {
    this.sentOnConnection = false;
    if (frame.resubscribe) {
      this.startSubscribing();
      return true;
    }
    this.host.removeSubscription(this);
    this.end({ channel: this.channel, code: 0, reason: frame.reason ?? "unsubscribed by the server" });
    return false;
  }

  /** A subscribe was refused. Returns whether it is worth retrying. */
  onSubscribeError(code: number, message: string): boolean {
    this.pendingSubscribeId = undefined;
    this.sentOnConnection = false;
    const error = { channel: this.channel, code, message };
    this.emit("error", error);
    this.options.onError?.(error);
    if (code === 429 || code === 409 || code >= 500) return true;
    this.host.removeSubscription(this);
    this.end({ channel: this.channel, code, reason: message });
    return false;
  }

  /** The connection dropped: subscribe again on the next one. */
  onConnectionLost(): void {
    this.pendingSubscribeId = undefined;
    this.sentOnConnection = false;
    if (this.currentState !== "unsubscribed") this.startSubscribing();
  }

  /** The client stopped for good (a stop close code or `disconnect()`). */
  onClientStopped(reason: string): void {
    for (const waiter of this.readyWaiters.splice(0)) waiter.reject(new Error(`${this.channel}: ${reason}`));
  }

  clearRetry(): void {
    if (this.retryTimer !== undefined) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
  }

  private end(context: UnsubscribedContext): void {
    this.clearRetry();
    this.setState("unsubscribed");
    for (const waiter of this.readyWaiters.splice(0)) waiter.reject(new Error(`${this.channel}: ${context.reason}`));
    this.emit("unsubscribed", context);
    this.options.onUnsubscribed?.(context);
  }

  private setState(state: SubscriptionState): void {
    if (state === this.currentState) return;
    const previous = this.currentState;
    this.currentState = state;
    this.emit("state", { channel: this.channel, previous, state });
  }
}

export function withTimeout<T>(promise: Promise<T>, timeoutMs: number | undefined, message: string): Promise<T> {
  if (timeoutMs === undefined) return promise;
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(message)), timeoutMs);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error instanceof Error ? error : new Error(String(error)));
      },
    );
  });
}
