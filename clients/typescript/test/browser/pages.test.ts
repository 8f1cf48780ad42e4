// The team feed and the live console in headless Chromium, against the real
// services (capture, broadcast, cache API, gateway) on the test's own
// database and Redis namespace: a row update appears on the page; the
// gateway restarts while rows change and the page ends with every change
// exactly once, in order, the ones made while it was away marked recovered;
// the console shows invalidations per second. Screenshots go to
// test-artifacts/.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";

import { type Browser, chromium, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import {
  DATABASE_URL,
  eventually,
  freePort,
  JWT_SECRET,
  REDIS_URL,
  redisCli,
  removeRedisNamespace,
  REPO,
  SERVICE_TOKEN,
  Service,
  uniqueEnv,
} from "../harness.js";

// @ts-expect-error -- a plain ES module without types (pages/serve.mjs)
import { startPages } from "../../pages/serve.mjs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const ARTIFACTS = join(REPO, "clients", "typescript", "test-artifacts");
const CACHE_TOKEN = "ts-browser-cache-token-0123456789";
const CONFIG = join(REPO, "deploy", "herald.toml");

const env = uniqueEnv("tsb");
const dbName = `herald_${env}`;
const dbUrl = DATABASE_URL.replace(/\/[^/?]*(\?|$)/, `/${dbName}$1`);
const services: Service[] = [];
let gateway: Service;
let ports: Record<string, number>;
let pages: { url: string; close(): Promise<void> };
let browser: Browser;

function psql(url: string, sql: string): string {
  const r = spawnSync("psql", [url, "-X", "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`psql: ${r.stderr}`);
  return r.stdout.trim();
}

async function ready(port: number): Promise<boolean> {
  try {
    return (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200;
  } catch {
    return false;
  }
}

beforeAll(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  psql(DATABASE_URL, `CREATE DATABASE ${dbName}`);
  spawnSync("psql", [dbUrl, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", join(REPO, "deploy", "demo.sql")], { encoding: "utf8" });
  ports = {};
  for (const name of ["capture_ops", "broadcast_ops", "cache_ops", "cache_http", "cache_grpc", "gw_http", "gw_grpc", "gw_ops"]) {
    ports[name] = await freePort();
  }
  const serviceEnv: Record<string, string> = {
    DATABASE_URL: dbUrl,
    REDIS_URL,
    HERALD_ENV: env,
    HERALD_CAPTURE__OPS_ADDR: `127.0.0.1:${ports.capture_ops}`,
    // deploy/herald.toml asks for the WAL source; the test's Postgres may
    // not run wal_level = logical, so capture takes what it offers.
    HERALD_CAPTURE__SOURCE: "auto",
    HERALD_BROADCAST__OPS_ADDR: `127.0.0.1:${ports.broadcast_ops}`,
    HERALD_BROADCAST__CONSUMER: `b-${env}`,
    HERALD_CACHE__OPS_ADDR: `127.0.0.1:${ports.cache_ops}`,
    HERALD_CACHE__HTTP_ADDR: `127.0.0.1:${ports.cache_http}`,
    HERALD_CACHE__GRPC_ADDR: `127.0.0.1:${ports.cache_grpc}`,
    HERALD_GATEWAY__LISTEN_ADDR: `127.0.0.1:${ports.gw_http}`,
    HERALD_GATEWAY__GRPC_ADDR: `127.0.0.1:${ports.gw_grpc}`,
    HERALD_GATEWAY__OPS_ADDR: `127.0.0.1:${ports.gw_ops}`,
    HERALD_GATEWAY__RECONNECT_JITTER_MS: "500",
    HERALD_GATEWAY__SHUTDOWN_GRACE_MS: "3000",
    HERALD_GATEWAY_JWT_SECRET: JWT_SECRET,
    HERALD_GATEWAY_SERVICE_TOKEN: SERVICE_TOKEN,
    HERALD_CACHE_TOKEN: CACHE_TOKEN,
  };
  const install = new Service("herald-capture", ["--config", CONFIG, "install"], serviceEnv);
  install.start();
  await new Promise<void>((resolve) => install.child?.once("exit", () => resolve()));
  expect(install.child?.exitCode ?? 0, install.log).toBe(0);
  for (const name of ["herald-capture", "herald-broadcast", "herald-cache-api", "herald-gateway"]) {
    const service = new Service(name, ["--config", CONFIG, "run"], serviceEnv);
    service.start();
    services.push(service);
  }
  gateway = services[3] as Service;
  for (const port of [ports.capture_ops, ports.broadcast_ops, ports.cache_ops, ports.gw_ops] as number[]) {
    await eventually(`service on ${port} ready\n${services.map((s) => s.log).join("\n")}`, () => ready(port), 60_000);
  }
  pages = await startPages({
    PAGES_ADDR: "127.0.0.1:0",
    HERALD_GATEWAY_WS: `ws://127.0.0.1:${ports.gw_http}/v1/ws`,
    HERALD_GATEWAY_JWT_SECRET: JWT_SECRET,
    HERALD_JWT_KID: "main",
    HERALD_CACHE_URL: `http://127.0.0.1:${ports.cache_http}`,
    HERALD_CACHE_TOKEN: CACHE_TOKEN,
  });
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: apt-get install -y chromium (.ci/run does)`);
  // No background networking: this machine has no way out, and Chromium would keep trying.
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

afterAll(async () => {
  await browser?.close();
  await pages?.close();
  for (const s of services) await s.stop("SIGKILL");
  removeRedisNamespace(REDIS_URL, env);
  spawnSync("psql", [DATABASE_URL, "-X", "-q", "-c", `DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`]);
});

interface FeedChange {
  offset: number;
  epoch: string;
  recovered: boolean;
  op: string;
  ids: string[];
}
interface Feed {
  changes: FeedChange[];
  reloads: number;
  recovered: number;
  states: string[];
  members: { id: number; name: string }[];
}

const feedOf = (page: Page) => page.evaluate(() => (window as unknown as { heraldFeed?: Feed }).heraldFeed);

/** Team 1's channel head: how many changes broadcast has published. */
function head(): number {
  const out = redisCli(REDIS_URL, ["HGET", `herald:${env}:t:{demo}:ch:team:1:meta`, "offset"]).trim();
  return out === "" ? 0 : Number(out);
}

let updates = 0;
function rename(id: number): string {
  updates += 1;
  const name = `Member ${id} v${updates}`;
  psql(dbUrl, `UPDATE res_users SET name = '${name}', updated_at = now() WHERE id = ${id}`);
  return name;
}

describe("pages in Chromium", () => {
  it("team feed: a row update appears; a gateway restart while rows change loses and repeats nothing", async () => {
    const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(`${pages.url}/team-feed.html?user=browser-test`);
    await eventually("snapshot loaded and connected", async () => {
      const f = await feedOf(page);
      return f && f.reloads >= 1 && f.states.at(-1) === "connected";
    });

    const first = rename(1);
    await page.getByRole("cell", { name: first }).waitFor({ timeout: 20_000 });
    await eventually("the change on the page", async () => (await feedOf(page))?.changes.length === 1);

    // The gateway stops while rows keep changing, and comes back.
    let writing = true;
    const writer = (async () => {
      while (writing) {
        rename(updates % 2 === 0 ? 1 : 2);
        await new Promise((r) => setTimeout(r, 150));
      }
    })();
    await new Promise((r) => setTimeout(r, 500));
    await gateway.stop("SIGTERM");
    const whileDown = head();
    await eventually("changes published while the gateway is down", () => head() >= whileDown + 3);
    gateway.start();
    await eventually("gateway back", () => ready(ports.gw_ops as number), 30_000);
    await eventually("the page reconnected", async () => (await feedOf(page))?.recovered === 1);
    await new Promise((r) => setTimeout(r, 500));
    writing = false;
    await writer;
    const last = `Member 2 final`;
    psql(dbUrl, `UPDATE res_users SET name = '${last}', updated_at = now() WHERE id = 2`);
    updates += 1;
    await eventually("every change on the page", async () => (await feedOf(page))?.changes.length === updates, 30_000);
    await page.getByRole("cell", { name: last }).waitFor({ timeout: 20_000 });

    const feed = (await feedOf(page)) as Feed;
    expect(head()).toBe(updates);
    expect(feed.changes.map((c) => c.offset)).toEqual(Array.from({ length: updates }, (_, i) => i + 1));
    expect(new Set(feed.changes.map((c) => c.epoch)).size).toBe(1);
    const recovered = feed.changes.filter((c) => c.recovered).map((c) => c.offset);
    expect(recovered.length).toBeGreaterThanOrEqual(3);
    // The recovered ones are exactly a contiguous run: what was published while away.
    expect(recovered).toEqual(Array.from({ length: recovered.length }, (_, i) => (recovered[0] as number) + i));
    expect(feed.reloads).toBe(1);
    expect(await page.locator("tr.recovered").count()).toBe(recovered.length);
    expect(errors).toEqual([]);
    await page.screenshot({ path: join(ARTIFACTS, "team-feed.png"), fullPage: true });
    await page.close();
  });

  it("live console: non-zero invalidations per second while rows change", async () => {
    const page = await browser.newPage({ viewport: { width: 1100, height: 560 } });
    await page.goto(`${pages.url}/console.html`);
    let writing = true;
    const writer = (async () => {
      while (writing) {
        rename(3);
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    try {
      const rate = page.locator("#broadcast tr", { hasText: "invalidations/s" }).locator("td.num");
      await eventually(
        "invalidations/s above zero",
        async () => Number(await rate.first().textContent({ timeout: 1000 })) > 0,
        30_000,
      );
      await page.locator("#gateways tr").first().waitFor();
      await page.screenshot({ path: join(ARTIFACTS, "console.png"), fullPage: true });
    } finally {
      writing = false;
      await writer;
    }
    await page.close();
  });
});
