// loadThenFollow: snapshot, then every change after it, once; and the
// publisher's retries with one idempotency key.
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { Herald, loadThenFollow } from "../../src/index.js";
import { Publisher, PublishError } from "../../src/publisher.js";
import { FakeSocket } from "./fake-socket.js";

beforeEach(() => {
  vi.useFakeTimers();
  FakeSocket.reset();
});
afterEach(() => vi.useRealTimers());

async function connected(): Promise<{ client: Herald; socket: FakeSocket }> {
  const client = new Herald("ws://x/v1/ws", { token: "t", websocket: FakeSocket, network: null, random: () => 0.5 });
  client.connect();
  await vi.advanceTimersByTimeAsync(0);
  const socket = FakeSocket.last();
  socket.open();
  socket.push({ type: "connected", id: 0, client: "c", ping_interval_ms: 25_000 });
  return { client, socket };
}

function reply(socket: FakeSocket, extra: Record<string, unknown>): void {
  const sub = socket.sentOf("subscribe").at(-1);
  socket.push({ type: "subscribed", id: sub?.id, channel: sub?.channel, missed: 0, ...extra });
}

describe("loadThenFollow", () => {
  it("buffers while the snapshot loads, drops what the snapshot has, applies the rest in order", async () => {
    const { client, socket } = await connected();
    let resolveSnapshot!: (v: { snapshot: string[]; position: { offset: number; epoch: string } }) => void;
    const fetchSnapshot = vi.fn(() => new Promise<{ snapshot: string[]; position: { offset: number; epoch: string } }>((r) => (resolveSnapshot = r)));
    const seen: string[] = [];
    const follower = loadThenFollow<string[], string>(client, "team:1", {
      fetchSnapshot,
      onSnapshot: (rows) => seen.push(`snapshot ${rows.join(",")}`),
      onPublication: (p) => seen.push(`pub ${p.offset}`),
    });
    expect(fetchSnapshot).not.toHaveBeenCalled();
    reply(socket, { offset: 10, epoch: "e", head: 10 });
    expect(fetchSnapshot).toHaveBeenCalledTimes(1);
    for (const offset of [11, 12, 13]) socket.push({ type: "pub", channel: "team:1", offset, epoch: "e", data: "x" });
    resolveSnapshot({ snapshot: ["a", "b"], position: { offset: 12, epoch: "e" } });
    await follower.loaded;
    socket.push({ type: "pub", channel: "team:1", offset: 14, epoch: "e", data: "x" });
    expect(seen).toEqual(["snapshot a,b", "pub 13", "pub 14"]);
  });

  it("reloads the snapshot when recovery fails", async () => {
    const { client, socket } = await connected();
    let n = 0;
    const snapshots: number[] = [];
    const follower = loadThenFollow<number>(client, "team:1", {
      fetchSnapshot: async () => ++n,
      onSnapshot: (s) => snapshots.push(s),
      onPublication: () => {},
    });
    reply(socket, { offset: 1, epoch: "e", head: 1 });
    await follower.loaded;
    socket.serverClose(1006);
    await vi.advanceTimersByTimeAsync(250);
    const next = FakeSocket.last();
    next.open();
    next.push({ type: "connected", id: 0, client: "c", ping_interval_ms: 25_000 });
    reply(next, { offset: 900, epoch: "e", head: 900, recovered: false });
    await vi.advanceTimersByTimeAsync(0);
    expect(snapshots).toEqual([1, 2]);
  });
});

describe("Publisher", () => {
  it("retries 503 and network errors with the same idempotency key", async () => {
    const bodies: Record<string, unknown>[] = [];
    const answers: (() => Response)[] = [
      () => new Response('{"error":"down"}', { status: 503 }),
      () => {
        throw new TypeError("fetch failed");
      },
      () => new Response('{"offset":7,"epoch":"e","duplicate":true,"local_only":false}', { status: 200 }),
    ];
    const fetch = vi.fn(async (_url: unknown, init?: RequestInit) => {
      bodies.push(JSON.parse(String(init?.body)) as Record<string, unknown>);
      return (answers.shift() as () => Response)();
    });
    const publisher = new Publisher({ url: "http://gw", token: "s", fetch: fetch as unknown as typeof globalThis.fetch });
    const result = publisher.publish({ tenant: "acme", channel: "team:1", data: { a: 1 } });
    await vi.advanceTimersByTimeAsync(10_000);
    await expect(result).resolves.toEqual({ offset: 7, epoch: "e", duplicate: true, localOnly: false });
    expect(bodies).toHaveLength(3);
    const keys = new Set(bodies.map((b) => b.idempotency_key));
    expect(keys.size).toBe(1);
    expect([...keys][0]).toMatch(/^[0-9a-f-]{36}$/);
  });

  it("does not retry a refusal (400)", async () => {
    const fetch = vi.fn(async () => new Response('{"error":"bad channel"}', { status: 400 }));
    const publisher = new Publisher({ url: "http://gw", token: "s", fetch: fetch as unknown as typeof globalThis.fetch });
    const result = publisher.publish({ tenant: "acme", channel: "nope", data: 1, idempotencyKey: "k" });
    await expect(result).rejects.toEqual(expect.objectContaining({ status: 400, message: expect.stringContaining("bad channel") }));
    await expect(result).rejects.toBeInstanceOf(PublishError);
    expect(fetch).toHaveBeenCalledTimes(1);
  });
});
