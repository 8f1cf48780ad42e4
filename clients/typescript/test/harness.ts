// Real Herald processes for the integration and browser tests: a gateway
// (and the other services) started from the Cargo target dir, a throwaway
// Redis when a test must stop one, tokens signed like the gateway expects,
// and the Redis namespace removed afterwards. No mocks of Redis or Postgres.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const REDIS_URL = process.env.REDIS_URL ?? "redis://127.0.0.1:6379";
export const DATABASE_URL = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";
export const JWT_SECRET = "ts-test-secret-0123456789-0123456789";
export const SERVICE_TOKEN = "ts-test-service-token-0123456789";

/** Where the debug binaries are (`make test` builds them first). */
export function binDir(): string {
  if (process.env.HERALD_BIN_DIR) return process.env.HERALD_BIN_DIR;
  return join(process.env.CARGO_TARGET_DIR ?? join(REPO, "target"), "debug");
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** Polls `check` until it returns a value (not undefined/false) or the deadline passes. */
export async function eventually<T>(what: string, check: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined && value !== false) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ""}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

export function uniqueEnv(prefix = "ts"): string {
  return `${prefix}${randomBytes(5).toString("hex")}`;
}

/** An HS256 client token for the test key. */
export function clientToken(claims: { tenant: string; sub: string; channels: string[] | string; expInS?: number }): string {
  const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const header = b64({ alg: "HS256", typ: "JWT", kid: "ts" });
  const payload = b64({ tenant: claims.tenant, sub: claims.sub, channels: claims.channels, iat: now, exp: now + (claims.expInS ?? 3600) });
  const signature = createHmac("sha256", JWT_SECRET).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

/** The `[gateway]` part every test process shares; `extra` is appended TOML. */
export function gatewayToml(ports: { http: number; grpc: number; ops: number }, extra = ""): string {
  return `
[gateway]
listen_addr = "127.0.0.1:${ports.http}"
grpc_addr = "127.0.0.1:${ports.grpc}"
ops_addr = "127.0.0.1:${ports.ops}"
presence_ttl_ms = 3000
shutdown_grace_ms = 3000
reconnect_jitter_ms = 300
[[gateway.jwt_keys]]
kid = "ts"
hs256_secret = "${JWT_SECRET}"
[[gateway.service_tokens]]
name = "ts-test"
token = "${SERVICE_TOKEN}"
tenants = ["*"]
[[gateway.namespaces]]
name = "team"
history_size = 1000
history_ttl_s = 300
presence = true
[[gateway.namespaces]]
name = "brief"
history_size = 100
history_ttl_s = 1
presence = false
[[gateway.namespaces]]
name = "ops"
history_size = 10
history_ttl_s = 60
presence = false
${extra}`;
}

/** A service process with its log kept for failures. */
export class Service {
  child: ChildProcess | undefined;
  log = "";

  constructor(
    readonly name: string,
    readonly args: string[],
    readonly env: Record<string, string>,
  ) {}

  start(): void {
    const binary = join(binDir(), this.name);
    if (!existsSync(binary)) {
      throw new Error(`${binary} not found: build it first (cargo build --workspace --bins; make test does) or set HERALD_BIN_DIR`);
    }
    this.log += `\n=== ${this.name} started ===\n`;
    const child = spawn(binary, this.args, {
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn", ...this.env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    child.stdout?.on("data", (d: Buffer) => (this.log += d.toString()));
    child.stderr?.on("data", (d: Buffer) => (this.log += d.toString()));
    child.on("error", (error) => (this.log += `spawn failed: ${String(error)}\n`));
    child.on("exit", (code, signal) => (this.log += `=== ${this.name} exited (${code ?? signal}) ===\n`));
    this.child = child;
  }

  /** Sends `signal` and waits for the exit. */
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
    await exited;
    clearTimeout(timer);
    this.child = undefined;
  }
}

/** A `herald-gateway run` process on its own ports. */
export class Gateway extends Service {
  private constructor(
    readonly ports: { http: number; grpc: number; ops: number },
    readonly configPath: string,
    env: Record<string, string>,
  ) {
    super("herald-gateway", ["--config", configPath, "run"], env);
  }

  static async start(options: { env: string; redisUrl?: string; extraToml?: string; dir: string }): Promise<Gateway> {
    const ports = { http: await freePort(), grpc: await freePort(), ops: await freePort() };
    const configPath = join(options.dir, `gateway-${ports.http}.toml`);
    writeFileSync(configPath, `env = "${options.env}"\n[redis]\nurl = "${options.redisUrl ?? REDIS_URL}"\n${gatewayToml(ports, options.extraToml)}`);
    const gateway = new Gateway(ports, configPath, {});
    gateway.start();
    await gateway.ready();
    return gateway;
  }

  get wsUrl(): string {
    return `ws://127.0.0.1:${this.ports.http}/v1/ws`;
  }

  get httpUrl(): string {
    return `http://127.0.0.1:${this.ports.http}`;
  }

  async ready(): Promise<void> {
    await eventually(`${this.name} ready\n${this.log}`, async () => (await this.readyz()) === 200);
  }

  async readyz(): Promise<number> {
    try {
      return (await fetch(`http://127.0.0.1:${this.ports.ops}/readyz`)).status;
    } catch {
      return 0;
    }
  }

  async metric(name: string): Promise<number> {
    const text = await (await fetch(`http://127.0.0.1:${this.ports.ops}/metrics`)).text();
    let sum = 0;
    for (const line of text.split("\n")) {
      if (line.startsWith(name) && (line[name.length] === " " || line[name.length] === "{")) {
        sum += Number(line.slice(line.lastIndexOf(" ") + 1));
      }
    }
    return sum;
  }
}

/** A throwaway redis-server (append-only, so a restart keeps channel state) that a test may stop and start. */
export class ThrowawayRedis {
  private child: ChildProcess | undefined;

  private constructor(
    readonly port: number,
    readonly dir: string,
  ) {}

  static async start(dir: string): Promise<ThrowawayRedis> {
    const redis = new ThrowawayRedis(await freePort(), dir);
    await redis.start();
    return redis;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    this.child = spawn(
      "redis-server",
      ["--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", this.dir],
      { stdio: "ignore" },
    );
    await eventually("redis-server answers", () => redisCli(this.url, ["PING"]).trim() === "PONG");
  }

  async stop(): Promise<void> {
    const child = this.child;
    if (!child) return;
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.kill("SIGTERM");
    await exited;
    this.child = undefined;
  }
}

export function redisCli(url: string, args: string[]): string {
  const result = spawnSync("redis-cli", ["-u", url, ...args], { encoding: "utf8" });
  if (result.status !== 0) throw new Error(`redis-cli ${args.join(" ")}: ${result.stderr}`);
  return result.stdout;
}

/** Deletes every key of `herald:{env}:`. */
export function removeRedisNamespace(url: string, env: string): void {
  const keys = redisCli(url, ["--scan", "--pattern", `herald:${env}:*`]).split("\n").filter(Boolean);
  for (let i = 0; i < keys.length; i += 500) redisCli(url, ["DEL", ...keys.slice(i, i + 500)]);
}

export function tempDir(): string {
  return mkdtempSync(join(tmpdir(), "herald-ts-"));
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}
