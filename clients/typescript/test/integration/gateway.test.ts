// The client against real herald-gateway processes and real Redis: a
// gateway stopped with SIGTERM, expired history, a Redis restart, a slow
// consumer, a retried publish. Each test has its own Redis namespace.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";

import { Herald } from "../../src/index.js";
import type { HeraldOptions, Publication, SubscribedContext, WebSocketConstructor } from "../../src/index.js";
import { Publisher } from "../../src/publisher.js";
import {
  clientToken,
  eventually,
  Gateway,
  REDIS_URL,
  redisCli,
  removeDir,
  removeRedisNamespace,
  SERVICE_TOKEN,
  tempDir,
  ThrowawayRedis,
  uniqueEnv,
} from "../harness.js";

const TENANT = "acme";
let dir: string;
const cleanups: (() => Promise<void> | void)[] = [];

beforeAll(() => {
  dir = tempDir();
});
afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  removeDir(dir);
});

async function gateway(options: { redisUrl?: string; extraToml?: string } = {}): Promise<{ gw: Gateway; env: string }> {
  const env = uniqueEnv();
  const gw = await Gateway.start({ env, dir, ...options });
  cleanups.push(async () => {
    await gw.stop("SIGKILL");
    if (!options.redisUrl) removeRedisNamespace(REDIS_URL, env);
  });
  return { gw, env };
}

function client(url: string, options: Partial<HeraldOptions> = {}): Herald {
  const c = new Herald(url, {
    token: clientToken({ tenant: TENANT, sub: "tester", channels: "*" }),
    websocket: WebSocket as unknown as WebSocketConstructor,
    minReconnectDelayMs: 100,
    maxReconnectDelayMs: 1000,
    ...options,
  });
  cleanups.push(() => c.disconnect());
  return c;
}

/** Records what a subscription saw. */
function recorder() {
  const pubs: Publication[] = [];
  const recovered: SubscribedContext[] = [];
  const reloads: SubscribedContext[] = [];
  return {
    pubs,
    recovered,
    reloads,
    options: {
      onPublication: (p: Publication) => pubs.push(p),
      onRecovered: (c: SubscribedContext) => recovered.push(c),
      onReload: (c: SubscribedContext) => reloads.push(c),
    },
    offsets: () => pubs.filter((p) => p.offset > 0).map((p) => p.offset),
  };
}

function publisher(gw: Gateway): Publisher {
  return new Publisher({ url: gw.httpUrl, token: SERVICE_TOKEN, minRetryDelayMs: 50, maxRetryDelayMs: 500 });
}

const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

describe("against real gateways", () => {
  it("SIGTERM: disconnect advice, reconnect, recovered: true, every publication once", async () => {
    const { gw: a, env } = await gateway();
    // A second node of the same installation keeps the publish API up.
    const b = await Gateway.start({ env, dir });
    cleanups.push(() => b.stop("SIGKILL"));
    const c = client(a.wsUrl);
    const codes: number[] = [];
    c.on("connecting", (e) => codes.push(e.code));
    const rec = recorder();
    c.connect();
    const sub = c.subscribe("team:1", rec.options);
    await sub.ready(10_000);
    const pub = publisher(b);
    for (let i = 1; i <= 5; i++) await pub.publish({ tenant: TENANT, channel: "team:1", data: { i } });
    await eventually("5 live publications", () => rec.pubs.length === 5);

    await a.stop("SIGTERM");
    // The advice came first; attempts while the node is down are refused (1006) and retried.
    expect(codes[0]).toBe(4000);
    expect(codes.slice(1).every((code) => code === 1006)).toBe(true);
    for (let i = 6; i <= 15; i++) await pub.publish({ tenant: TENANT, channel: "team:1", data: { i } });
    a.start(); // the same node comes back on the same port
    await a.ready();
    await eventually("recovered", () => rec.recovered.length === 1);
    for (let i = 16; i <= 20; i++) await pub.publish({ tenant: TENANT, channel: "team:1", data: { i } });
    await eventually("20 publications", () => rec.pubs.length >= 20);

    expect(rec.offsets()).toEqual(range(1, 20));
    expect(rec.pubs.map((p) => (p.data as { i: number }).i)).toEqual(range(1, 20));
    expect(rec.pubs.filter((p) => p.recovered).map((p) => p.offset)).toEqual(range(6, 15));
    expect(rec.reloads).toEqual([]);
    expect(rec.recovered[0]?.missed).toBe(10);
  });

  it("history expired while away: onReload, then live again", async () => {
    const { gw, env } = await gateway();
    const c = client(gw.wsUrl);
    const rec = recorder();
    c.connect();
    const sub = c.subscribe("brief:1", rec.options);
    await sub.ready(10_000);
    const pub = publisher(gw);
    await pub.publish({ tenant: TENANT, channel: "brief:1", data: 1 });
    await eventually("first publication", () => rec.pubs.length === 1);
    c.disconnect();
    // The namespace keeps state for 1 s: wait until Redis has expired it.
    const meta = `herald:${env}:t:{${TENANT}}:ch:brief:1:meta`;
    await eventually("channel state expired", () => redisCli(REDIS_URL, ["EXISTS", meta]).trim() === "0", 10_000);
    const missed = await pub.publish({ tenant: TENANT, channel: "brief:1", data: 2 });
    expect(missed.offset).toBe(1); // a new epoch
    c.connect();
    await eventually("reload", () => rec.reloads.length === 1);
    expect(rec.recovered).toEqual([]);
    await pub.publish({ tenant: TENANT, channel: "brief:1", data: 3 });
    await eventually("live after the reload", () => rec.pubs.length === 2);
    expect(rec.pubs.map((p) => p.data)).toEqual([1, 3]);
  });

  it("Redis restart: degraded, then back, recovering from the last position", async () => {
    const redis = await ThrowawayRedis.start(dir);
    cleanups.push(() => redis.stop());
    const { gw } = await gateway({ redisUrl: redis.url });
    const c = client(gw.wsUrl);
    const before = recorder();
    c.connect();
    const a = c.subscribe("team:1", before.options);
    await a.ready(10_000);
    const pub = publisher(gw);
    await pub.publish({ tenant: TENANT, channel: "team:1", data: "before" });
    await eventually("publication before the outage", () => before.pubs.length === 1);

    await redis.stop();
    await eventually("gateway sees the outage", async () => (await gw.readyz()) === 503);
    const during = recorder();
    const b = c.subscribe("team:2", during.options);
    await b.ready(10_000);
    expect(b.degraded).toBe(true);
    const local = await pub.publish({ tenant: TENANT, channel: "team:2", data: "local" });
    expect(local.localOnly).toBe(true);
    await eventually("local delivery while degraded", () => during.pubs.length === 1);
    expect(during.pubs[0]?.offset).toBe(0);

    await redis.start();
    await eventually("gateway ready", async () => (await gw.readyz()) === 200);
    // A degraded subscription is ended (resubscribe) at its channel's next publication.
    await pub.publish({ tenant: TENANT, channel: "team:1", data: "after" });
    await pub.publish({ tenant: TENANT, channel: "team:2", data: "after" });
    await eventually("back: subscribed, not degraded", () => b.state === "subscribed" && !b.degraded);
    // team:2 had no position from before the outage: what it missed is a reload, not a silent skip.
    expect(during.reloads).toHaveLength(1);
    await pub.publish({ tenant: TENANT, channel: "team:2", data: "again" });
    await eventually("both channels live", () => before.pubs.length === 2 && during.pubs.length === 2);
    expect(before.offsets()).toEqual([1, 2]);
    expect(before.reloads).toEqual([]);
    expect(during.pubs.map((p) => p.data)).toEqual(["local", "again"]);
  });

  it("a slow consumer closed with 4001 reconnects and recovers (or is told to reload), never a silent gap", async () => {
    const { gw } = await gateway({
      extraToml: "[gateway.limits]\nmax_publication_bytes = 20000\nmax_queue_bytes = 60000\npublish_ops_per_s = 100000\n",
    });
    // A WebSocket whose reading the test can pause, as a busy tab would.
    const sockets: WebSocket[] = [];
    class Pausable extends WebSocket {
      constructor(url: string) {
        super(url);
        sockets.push(this);
      }
    }
    const c = client(gw.wsUrl, { websocket: Pausable as unknown as WebSocketConstructor });
    const codes: number[] = [];
    c.on("connecting", (e) => codes.push(e.code));
    const rec = recorder();
    c.connect();
    const sub = c.subscribe("team:1", rec.options);
    await sub.ready(10_000);
    sockets[0]?.pause();
    const pub = publisher(gw);
    const payload = "x".repeat(16_000);
    let published = 0;
    while ((await gw.metric("herald_gateway_slow_closes_total")) === 0) {
      await Promise.all(range(1, 20).map(() => pub.publish({ tenant: TENANT, channel: "team:1", data: payload })));
      published += 20;
      if (published > 5000) throw new Error("the gateway never closed the paused socket");
    }
    sockets[0]?.resume();
    await eventually("closed with 4001 and reconnected", () => codes.includes(4001) && sub.state === "subscribed");
    await pub.publish({ tenant: TENANT, channel: "team:1", data: "last" });
    published += 1;
    await eventually("the last publication", () => rec.pubs.at(-1)?.data === "last");
    const offsets = rec.offsets();
    if (rec.reloads.length === 0) {
      expect(rec.recovered.length).toBeGreaterThan(0);
      expect(offsets).toEqual(range(1, published));
    } else {
      // Told to reload: what follows the reload is contiguous up to the head.
      const tail = offsets.slice(offsets.lastIndexOf(offsets.find((o, i) => i > 0 && o !== (offsets[i - 1] ?? 0) + 1) ?? 1));
      expect(tail.at(-1)).toBe(published);
      for (let i = 1; i < tail.length; i++) expect(tail[i]).toBe((tail[i - 1] ?? 0) + 1);
    }
    expect(new Set(offsets).size).toBe(offsets.length);
  });

  it("a publish retried with its idempotency key makes one publication", async () => {
    const { gw } = await gateway();
    const c = client(gw.wsUrl);
    const rec = recorder();
    c.connect();
    await c.subscribe("team:7", rec.options).ready(10_000);
    // The first answer is lost after the gateway has published.
    let calls = 0;
    const lossy: typeof fetch = async (input, init) => {
      const response = await fetch(input, init);
      if (++calls === 1) throw new TypeError("connection reset");
      return response;
    };
    const pub = new Publisher({ url: gw.httpUrl, token: SERVICE_TOKEN, fetch: lossy, minRetryDelayMs: 10 });
    const result = await pub.publish({ tenant: TENANT, channel: "team:7", data: { order: 17 }, idempotencyKey: "order-17-shipped" });
    expect(calls).toBe(2);
    expect(result.duplicate).toBe(true);
    await publisher(gw).publish({ tenant: TENANT, channel: "team:7", data: "marker" });
    await eventually("marker", () => rec.pubs.at(-1)?.data === "marker");
    expect(rec.pubs.map((p) => p.data)).toEqual([{ order: 17 }, "marker"]);
  });

  it("the ops channel: stats each second for an ops token; any other tenant's token is refused", async () => {
    const { gw } = await gateway({ extraToml: '[gateway.ops]\ntenant = "ops"\nchannel = "ops:stats"\ninterval_ms = 200\n' });
    const ops = client(gw.wsUrl, { token: clientToken({ tenant: "ops", sub: "console", channels: ["ops:*"] }) });
    const stats: Publication[] = [];
    ops.connect();
    await ops.subscribe("ops:stats", { onPublication: (p) => stats.push(p) }).ready(10_000);
    await eventually("a gateway stats message", () => stats.find((p) => (p.data as { source?: string }).source === "gateway"));
    const message = stats[0]?.data as { sockets: number; subscriptions: number };
    expect(message.sockets).toBeGreaterThanOrEqual(1);

    const other = client(gw.wsUrl, { token: clientToken({ tenant: TENANT, sub: "nosy", channels: "*" }) });
    other.connect();
    const errors: number[] = [];
    const refused = other.subscribe("ops:stats", { onError: (e) => errors.push(e.code) });
    await expect(refused.ready(10_000)).rejects.toThrow();
    expect(errors).toEqual([403]);
    await expect(other.presence("ops:stats")).rejects.toThrow(/403|404/);
  });
});
