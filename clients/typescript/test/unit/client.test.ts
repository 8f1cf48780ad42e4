// The client's state machine against a fake socket, with fake timers: every
// close code, the backoff, tokens, subscriptions across reconnects, offsets.
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { Backoff, Herald, UnauthorizedError } from "../../src/index.js";
import type { HeraldOptions, Publication, SubscribedContext } from "../../src/index.js";
import { FakeSocket, tokenWithExp } from "./fake-socket.js";

const URL = "ws://gateway.test/v1/ws";

function client(options: Partial<HeraldOptions> = {}): Herald {
  return new Herald(URL, { token: "t0", websocket: FakeSocket, network: null, random: () => 0.5, ...options });
}

/** Lets pending promises (getToken) settle without moving the clock. */
async function settle(): Promise<void> {
  await vi.advanceTimersByTimeAsync(0);
}

/** Opens the newest socket and answers `connect`. */
async function accept(pingIntervalMs = 25_000): Promise<FakeSocket> {
  await settle();
  const socket = FakeSocket.last();
  socket.open();
  const connect = socket.sentOf("connect")[0];
  expect(connect).toBeDefined();
  socket.push({ type: "connected", id: connect?.id, client: "c-1", ping_interval_ms: pingIntervalMs });
  return socket;
}

/** Answers the newest `subscribe` of `channel`. */
function subscribed(socket: FakeSocket, channel: string, reply: Record<string, unknown>): void {
  const sub = socket.sentOf("subscribe").filter((f) => f.channel === channel).at(-1);
  expect(sub, `a subscribe of ${channel}`).toBeDefined();
  socket.push({ type: "subscribed", id: sub?.id, channel, missed: 0, ...reply });
}

function pub(socket: FakeSocket, channel: string, offset: number, epoch: string, data: unknown = { n: offset }): void {
  socket.push({ type: "pub", channel, offset, epoch, data });
}

beforeEach(() => {
  vi.useFakeTimers();
  FakeSocket.reset();
});
afterEach(() => {
  vi.useRealTimers();
});

describe("states", () => {
  it("goes disconnected → connecting → connected → disconnected, with events in order", async () => {
    const c = client();
    const states: string[] = [];
    c.on("state", (e) => states.push(`${e.previous}->${e.state}`));
    expect(c.state).toBe("disconnected");
    await expect(c.ready()).rejects.toThrow(/disconnected/);
    c.connect();
    const ready = c.ready(1000);
    expect(c.state).toBe("connecting");
    await accept();
    expect(c.state).toBe("connected");
    await expect(ready).resolves.toBeUndefined();
    expect(c.client).toBe("c-1");
    c.disconnect();
    expect(c.state).toBe("disconnected");
    expect(FakeSocket.last().closedByClient?.code).toBe(1000);
    expect(states).toEqual(["disconnected->connecting", "connecting->connected", "connected->disconnected"]);
  });

  it("ready() rejects once the client stops", async () => {
    const c = client();
    c.connect();
    const ready = c.ready();
    await settle();
    FakeSocket.last().open();
    FakeSocket.last().serverClose(4501, "unauthorized");
    await expect(ready).rejects.toThrow(/unauthorized/);
  });

  it("a connect that gets no answer times out and is retried", async () => {
    const c = client({ connectTimeoutMs: 3000 });
    c.connect();
    await settle();
    FakeSocket.last().open();
    await vi.advanceTimersByTimeAsync(3000);
    expect(FakeSocket.instances[0]?.closedByClient).toBeDefined();
    expect(c.state).toBe("connecting");
    await vi.advanceTimersByTimeAsync(250);
    expect(FakeSocket.instances.length).toBe(2);
  });
});

describe("close codes", () => {
  const reconnecting = [4000, 4001, 4002, 4003, 4004, 4005, 4499, 1000, 1001, 1006, 1011];
  for (const code of reconnecting) {
    it(`${code} reconnects with backoff and resubscribes`, async () => {
      const c = client();
      c.connect();
      const socket = await accept();
      c.subscribe("team:1");
      subscribed(socket, "team:1", { offset: 3, epoch: "e1", head: 3 });
      const events: string[] = [];
      c.on("connecting", (e) => events.push(`connecting ${e.code}`));
      socket.serverClose(code);
      expect(c.state).toBe("connecting");
      expect(c.getSubscription("team:1")?.state).toBe("subscribing");
      expect(events).toEqual([`connecting ${code}`]);
      // random 0.5 · ceiling 500 ms
      await vi.advanceTimersByTimeAsync(249);
      expect(FakeSocket.instances.length).toBe(1);
      await vi.advanceTimersByTimeAsync(1);
      const next = await accept();
      expect(next.sentOf("subscribe")).toEqual([
        { type: "subscribe", id: expect.any(Number), channel: "team:1", recover: { offset: 3, epoch: "e1" } },
      ]);
    });
  }

  for (const code of [4500, 4501, 4503, 4504]) {
    it(`${code} stops: no reconnect`, async () => {
      const c = client();
      const disconnected: number[] = [];
      c.on("disconnected", (e) => disconnected.push(e.code));
      c.connect();
      const socket = await accept();
      socket.serverClose(code, "nope");
      expect(c.state).toBe("disconnected");
      expect(disconnected).toEqual([code]);
      await vi.advanceTimersByTimeAsync(120_000);
      expect(FakeSocket.instances.length).toBe(1);
    });
  }

  it("4502 with getToken: a fresh token, then reconnect", async () => {
    let n = 0;
    const getToken = vi.fn(async () => `token-${++n}`);
    const c = client({ token: undefined, getToken });
    c.connect();
    const first = await accept();
    expect(first.sentOf("connect")[0]?.token).toBe("token-1");
    first.serverClose(4502, "token expired");
    expect(c.state).toBe("connecting");
    await vi.advanceTimersByTimeAsync(500);
    const second = await accept();
    expect(getToken).toHaveBeenCalledTimes(2);
    expect(second.sentOf("connect")[0]?.token).toBe("token-2");
  });

  it("4502 without getToken stops", async () => {
    const c = client();
    c.connect();
    (await accept()).serverClose(4502);
    expect(c.state).toBe("disconnected");
  });

  it("a disconnect frame's reconnect_after_ms is the wait, to the millisecond", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    socket.push({ type: "disconnect", code: 4000, reason: "node shutting down", reconnect: true, reconnect_after_ms: 1734 });
    socket.serverClose(4000);
    await vi.advanceTimersByTimeAsync(1733);
    expect(FakeSocket.instances.length).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(FakeSocket.instances.length).toBe(2);
  });

  it("a lost close frame: the disconnect frame's code decides (stop)", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    socket.push({ type: "disconnect", code: 4503, reason: "forbidden", reconnect: false });
    socket.serverClose(1006);
    expect(c.state).toBe("disconnected");
  });

  it("a refused upgrade (HTTP 429/503, seen as 1006) retries with growing backoff", async () => {
    const c = client({ random: () => 0.999_999 });
    const delays: number[] = [];
    c.connect();
    await settle();
    let last = Date.now();
    for (let i = 0; i < 8; i++) {
      const socket = FakeSocket.last();
      socket.onerror?.({ message: "Unexpected server response: 503" });
      socket.serverClose(1006);
      const before = FakeSocket.instances.length;
      while (FakeSocket.instances.length === before) await vi.advanceTimersByTimeAsync(1);
      delays.push(Date.now() - last);
      last = Date.now();
    }
    // floor(0.999999 · ceiling): the ceilings 0.5 s, 1 s, … capped at 20 s.
    expect(delays).toEqual([499, 999, 1999, 3999, 7999, 15_999, 19_999, 19_999]);
  });
});

describe("backoff", () => {
  it("stays within [0, min(20 s, 0.5 s · 2^n)] and resets", () => {
    for (const r of [0, 0.25, 0.999_999]) {
      const b = new Backoff(500, 20_000, () => r);
      for (let n = 0; n < 40; n++) {
        const ceiling = Math.min(20_000, 500 * 2 ** n);
        expect(b.ceiling()).toBe(ceiling);
        const d = b.next();
        expect(d).toBeGreaterThanOrEqual(0);
        expect(d).toBeLessThanOrEqual(ceiling);
      }
      b.reset();
      expect(b.ceiling()).toBe(500);
    }
  });

  it("a successful connect resets the backoff", async () => {
    const c = client({ random: () => 0.999_999 });
    c.connect();
    await settle();
    FakeSocket.last().serverClose(1006);
    await vi.advanceTimersByTimeAsync(500);
    FakeSocket.last().serverClose(1006);
    await vi.advanceTimersByTimeAsync(1000);
    const socket = await accept();
    socket.serverClose(1006);
    const before = FakeSocket.instances.length;
    await vi.advanceTimersByTimeAsync(498);
    expect(FakeSocket.instances.length).toBe(before);
    await vi.advanceTimersByTimeAsync(1);
    expect(FakeSocket.instances.length).toBe(before + 1);
  });
});

describe("tokens", () => {
  it("a token that expired while disconnected is replaced before reconnecting", async () => {
    const now = Math.floor(Date.now() / 1000);
    const tokens = [tokenWithExp(now + 60, "a"), tokenWithExp(now + 3600, "b")];
    const getToken = vi.fn(async () => tokens.shift() as string);
    const c = client({ token: undefined, getToken });
    c.connect();
    const first = await accept();
    expect(getToken).toHaveBeenCalledTimes(1);
    first.push({ type: "disconnect", code: 4000, reason: "shutdown", reconnect: true, reconnect_after_ms: 120_000 });
    first.serverClose(4000);
    await vi.advanceTimersByTimeAsync(120_000);
    const second = await accept();
    expect(getToken).toHaveBeenCalledTimes(2);
    expect(second.sentOf("connect")[0]?.token).toContain(tokenWithExp(now + 3600, "b").split(".")[1]);
  });

  it("a token still valid is reused on reconnect", async () => {
    const getToken = vi.fn(async () => tokenWithExp(Math.floor(Date.now() / 1000) + 3600));
    const c = client({ token: undefined, getToken });
    c.connect();
    (await accept()).serverClose(1006);
    await vi.advanceTimersByTimeAsync(250);
    await accept();
    expect(getToken).toHaveBeenCalledTimes(1);
  });

  it("getToken throwing UnauthorizedError stops retrying", async () => {
    const getToken = vi.fn(async (): Promise<string> => {
      throw new UnauthorizedError("logged out");
    });
    const c = client({ token: undefined, getToken });
    const gone: string[] = [];
    c.on("disconnected", (e) => gone.push(e.reason));
    c.connect();
    await settle();
    expect(c.state).toBe("disconnected");
    expect(gone).toEqual(["logged out"]);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(getToken).toHaveBeenCalledTimes(1);
    expect(FakeSocket.instances.length).toBe(0);
  });

  it("getToken failing otherwise is retried with backoff", async () => {
    let calls = 0;
    const getToken = vi.fn(async () => {
      if (++calls < 3) throw new Error("auth service down");
      return "ok-token";
    });
    const c = client({ token: undefined, getToken });
    c.connect();
    await vi.advanceTimersByTimeAsync(2_000);
    const socket = await accept();
    expect(socket.sentOf("connect")[0]?.token).toBe("ok-token");
    expect(c.state).toBe("connected");
  });

  it("subscribe while the token fetch is pending sends one subscribe, after connect (centrifuge-js #265)", async () => {
    let release!: (token: string) => void;
    const getToken = () => new Promise<string>((resolve) => (release = resolve));
    const c = client({ token: undefined, getToken });
    c.connect();
    await settle();
    const a = c.subscribe("team:1");
    const b = c.subscribe("team:2");
    expect(a.state).toBe("subscribing");
    expect(FakeSocket.instances.length).toBe(0);
    release("late-token");
    const socket = await accept();
    expect(socket.sent.map((f) => `${String(f.type)} ${String(f.channel ?? f.token)}`)).toEqual([
      "connect late-token",
      "subscribe team:1",
      "subscribe team:2",
    ]);
    subscribed(socket, "team:1", { offset: 0, epoch: "", head: 0 });
    await expect(a.ready()).resolves.toBeUndefined();
    expect(b.state).toBe("subscribing");
  });
});

describe("subscriptions across reconnects", () => {
  it("unsubscribe, then reconnect: the channel is not subscribed again (centrifuge-js #83)", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    const sub = c.subscribe("team:1");
    subscribed(socket, "team:1", { offset: 1, epoch: "e", head: 1 });
    c.subscribe("team:2");
    sub.unsubscribe();
    expect(sub.state).toBe("unsubscribed");
    expect(socket.sentOf("unsubscribe").map((f) => f.channel)).toEqual(["team:1"]);
    socket.serverClose(1006);
    await vi.advanceTimersByTimeAsync(250);
    const next = await accept();
    expect(next.sentOf("subscribe").map((f) => f.channel)).toEqual(["team:2"]);
    expect(c.getSubscription("team:1")).toBeUndefined();
  });

  it("unsubscribe while disconnected sends nothing and is not resubscribed", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    const sub = c.subscribe("team:1");
    subscribed(socket, "team:1", { offset: 1, epoch: "e", head: 1 });
    socket.serverClose(1006);
    sub.unsubscribe();
    await vi.advanceTimersByTimeAsync(250);
    const next = await accept();
    expect(next.sentOf("subscribe")).toEqual([]);
    expect(next.sentOf("unsubscribe")).toEqual([]);
  });

  it("unsubscribe and subscribe again before the replies: only the new subscribe's reply counts", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    const first = c.subscribe("team:1");
    const firstId = socket.sentOf("subscribe")[0]?.id;
    first.unsubscribe();
    const got: number[] = [];
    const second = c.subscribe("team:1", { onPublication: (p) => got.push(p.offset) });
    // The server answers in order: the first subscribe, its unsubscribe, the second subscribe.
    socket.push({ type: "subscribed", id: firstId, channel: "team:1", offset: 4, epoch: "e", head: 4, missed: 0 });
    pub(socket, "team:1", 5, "e");
    expect(second.state).toBe("subscribing");
    socket.push({ type: "unsubscribed", id: socket.sentOf("unsubscribe")[0]?.id, channel: "team:1" });
    subscribed(socket, "team:1", { offset: 5, epoch: "e", head: 5 });
    expect(second.state).toBe("subscribed");
    pub(socket, "team:1", 6, "e");
    expect(got).toEqual([6]);
  });

  it("recovers from the last position: recovered → onRecovered and replayed pubs marked recovered", async () => {
    const c = client();
    c.connect();
    let socket = await accept();
    const pubs: Publication[] = [];
    const recovered: SubscribedContext[] = [];
    c.subscribe("team:1", { onPublication: (p) => pubs.push(p), onRecovered: (ctx) => recovered.push(ctx) });
    subscribed(socket, "team:1", { offset: 10, epoch: "e", head: 10 });
    pub(socket, "team:1", 11, "e");
    socket.serverClose(4000);
    await vi.advanceTimersByTimeAsync(250);
    socket = await accept();
    expect(socket.sentOf("subscribe")[0]?.recover).toEqual({ offset: 11, epoch: "e" });
    subscribed(socket, "team:1", { offset: 11, epoch: "e", head: 13, recovered: true, missed: 2 });
    pub(socket, "team:1", 12, "e");
    pub(socket, "team:1", 13, "e");
    pub(socket, "team:1", 14, "e");
    expect(recovered.map((r) => r.missed)).toEqual([2]);
    expect(pubs.map((p) => `${p.offset}${p.recovered ? "r" : ""}`)).toEqual(["11", "12r", "13r", "14"]);
    expect(c.getSubscription("team:1")?.position).toEqual({ offset: 14, epoch: "e" });
  });

  it("not recovered → onReload, then continues from the reply's position", async () => {
    const c = client();
    c.connect();
    let socket = await accept();
    const reloads: SubscribedContext[] = [];
    const pubs: number[] = [];
    c.subscribe("team:1", { onReload: (ctx) => reloads.push(ctx), onPublication: (p) => pubs.push(p.offset) });
    subscribed(socket, "team:1", { offset: 2, epoch: "e", head: 2 });
    socket.serverClose(1006);
    await vi.advanceTimersByTimeAsync(250);
    socket = await accept();
    subscribed(socket, "team:1", { offset: 500, epoch: "e", head: 500, recovered: false });
    pub(socket, "team:1", 501, "e");
    expect(reloads).toHaveLength(1);
    expect(pubs).toEqual([501]);
  });

  it("a position given at subscribe is recovered from on the first subscribe", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    c.subscribe("team:1", { position: { offset: 7, epoch: "stored" } });
    expect(socket.sentOf("subscribe")[0]?.recover).toEqual({ offset: 7, epoch: "stored" });
  });

  it("a channel without state then and now is recovered (nothing missed), not reloaded", async () => {
    const c = client();
    c.connect();
    let socket = await accept();
    const reloads: unknown[] = [];
    c.subscribe("team:1", { onReload: (ctx) => reloads.push(ctx) });
    subscribed(socket, "team:1", { offset: 0, epoch: "", head: 0 });
    socket.serverClose(1006);
    await vi.advanceTimersByTimeAsync(250);
    socket = await accept();
    subscribed(socket, "team:1", { offset: 0, epoch: "", head: 0, recovered: false });
    expect(reloads).toEqual([]);
  });

  it("server unsubscribed with resubscribe → subscribe again with recover", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    const sub = c.subscribe("team:1");
    subscribed(socket, "team:1", { offset: 3, epoch: "e", head: 3 });
    socket.push({ type: "unsubscribed", channel: "team:1", reason: "insufficient_state", resubscribe: true });
    expect(sub.state).toBe("subscribing");
    expect(socket.sentOf("subscribe").at(-1)?.recover).toEqual({ offset: 3, epoch: "e" });
  });

  it("degraded: offset-0 publications delivered without moving the position; back → recover", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    const pubs: number[] = [];
    const reloads: unknown[] = [];
    const sub = c.subscribe("team:1", { onPublication: (p) => pubs.push(p.offset), onReload: (x) => reloads.push(x) });
    subscribed(socket, "team:1", { offset: 3, epoch: "e", head: 3 });
    socket.push({ type: "unsubscribed", channel: "team:1", reason: "insufficient_state", resubscribe: true });
    subscribed(socket, "team:1", { offset: 0, epoch: "", head: 0, degraded: true, recovered: false });
    expect(sub.degraded).toBe(true);
    expect(reloads).toEqual([]);
    pub(socket, "team:1", 0, "");
    expect(sub.position).toEqual({ offset: 3, epoch: "e" });
    socket.push({ type: "unsubscribed", channel: "team:1", reason: "redis is back", resubscribe: true });
    expect(socket.sentOf("subscribe").at(-1)?.recover).toEqual({ offset: 3, epoch: "e" });
    subscribed(socket, "team:1", { offset: 3, epoch: "e", head: 4, recovered: true, missed: 1 });
    pub(socket, "team:1", 4, "e");
    expect(sub.degraded).toBe(false);
    expect(pubs).toEqual([0, 4]);
  });

  it("a subscription that began degraded recovers from (0, \"\") when Redis is back", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    const reloads: unknown[] = [];
    c.subscribe("team:1", { onReload: (x) => reloads.push(x) });
    subscribed(socket, "team:1", { offset: 0, epoch: "", head: 0, degraded: true });
    socket.push({ type: "unsubscribed", channel: "team:1", reason: "redis is back", resubscribe: true });
    expect(socket.sentOf("subscribe").at(-1)?.recover).toEqual({ offset: 0, epoch: "" });
    subscribed(socket, "team:1", { offset: 1, epoch: "new", head: 1, recovered: false });
    expect(reloads).toHaveLength(1);
  });

  it("a refused subscribe: 403 ends it, 429 retries", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    const denied = c.subscribe("team:9");
    const ended: number[] = [];
    denied.on("unsubscribed", (e) => ended.push(e.code));
    socket.push({ type: "error", id: socket.sentOf("subscribe")[0]?.id, code: 403, message: "no" });
    expect(denied.state).toBe("unsubscribed");
    expect(ended).toEqual([403]);
    const limited = c.subscribe("team:2");
    socket.push({ type: "error", id: socket.sentOf("subscribe").at(-1)?.id, code: 429, message: "slow down" });
    expect(limited.state).toBe("subscribing");
    await vi.advanceTimersByTimeAsync(2_000);
    expect(socket.sentOf("subscribe").filter((f) => f.channel === "team:2")).toHaveLength(2);
  });
});

describe("offsets", () => {
  async function live(): Promise<{ socket: FakeSocket; got: Publication[] }> {
    const c = client();
    c.connect();
    const socket = await accept();
    const got: Publication[] = [];
    c.subscribe("team:1", { onPublication: (p) => got.push(p) });
    subscribed(socket, "team:1", { offset: 5, epoch: "e", head: 5 });
    return { socket, got };
  }

  it("a duplicate is dropped", async () => {
    const { socket, got } = await live();
    pub(socket, "team:1", 6, "e");
    pub(socket, "team:1", 6, "e");
    pub(socket, "team:1", 5, "e");
    pub(socket, "team:1", 7, "e");
    expect(got.map((p) => p.offset)).toEqual([6, 7]);
  });

  it("a gap recovers from the last position instead of skipping", async () => {
    const { socket, got } = await live();
    pub(socket, "team:1", 6, "e");
    pub(socket, "team:1", 9, "e");
    expect(socket.sentOf("unsubscribe").map((f) => f.channel)).toEqual(["team:1"]);
    expect(socket.sentOf("subscribe").at(-1)?.recover).toEqual({ offset: 6, epoch: "e" });
    // Publications before the new reply belong to the old subscription.
    pub(socket, "team:1", 10, "e");
    socket.push({ type: "unsubscribed", id: socket.sentOf("unsubscribe")[0]?.id, channel: "team:1" });
    subscribed(socket, "team:1", { offset: 6, epoch: "e", head: 10, recovered: true, missed: 4 });
    for (const o of [7, 8, 9, 10, 11]) pub(socket, "team:1", o, "e");
    expect(got.map((p) => p.offset)).toEqual([6, 7, 8, 9, 10, 11]);
  });

  it("a new epoch at offset 1 is not a loss; a new epoch past 1 is a gap", async () => {
    const { socket, got } = await live();
    pub(socket, "team:1", 1, "e2");
    expect(got.map((p) => `${p.epoch}:${p.offset}`)).toEqual(["e2:1"]);
    pub(socket, "team:1", 3, "e3");
    expect(socket.sentOf("subscribe").at(-1)?.recover).toEqual({ offset: 1, epoch: "e2" });
  });
});

describe("liveness", () => {
  it("pings when idle and replaces a silent connection", async () => {
    const c = client();
    c.connect();
    const socket = await accept(1000);
    await vi.advanceTimersByTimeAsync(1000);
    const ping = socket.sentOf("ping")[0];
    expect(ping).toBeDefined();
    socket.push({ type: "pong", id: ping?.id });
    await vi.advanceTimersByTimeAsync(1500);
    expect(c.state).toBe("connected");
    // Silence from here on: dead after twice the interval.
    await vi.advanceTimersByTimeAsync(2500);
    expect(socket.closedByClient).toBeDefined();
    expect(c.state).toBe("connecting");
    await vi.advanceTimersByTimeAsync(500);
    expect(FakeSocket.instances.length).toBe(2);
  });

  it("ping() and presence() are request/reply", async () => {
    const c = client();
    c.connect();
    const socket = await accept();
    const presence = c.presence("team:1");
    await settle();
    const req = socket.sentOf("presence")[0];
    socket.push({ type: "presence", id: req?.id, channel: "team:1", clients: [{ client: "c-1", user: "u" }] });
    await expect(presence).resolves.toEqual([{ client: "c-1", user: "u" }]);
    const denied = c.presence("team:2");
    await settle();
    socket.push({ type: "error", id: socket.sentOf("presence")[1]?.id, code: 404, message: "presence is off" });
    await expect(denied).rejects.toThrow(/404/);
  });
});

describe("network", () => {
  it("offline closes and waits; online reconnects at once", async () => {
    const network = new EventTarget();
    const c = client({ network });
    c.connect();
    const socket = await accept();
    network.dispatchEvent(new Event("offline"));
    expect(socket.closedByClient).toBeDefined();
    expect(c.state).toBe("connecting");
    await vi.advanceTimersByTimeAsync(120_000);
    expect(FakeSocket.instances.length).toBe(1);
    network.dispatchEvent(new Event("online"));
    await settle();
    expect(FakeSocket.instances.length).toBe(2);
    c.disconnect();
  });
});
