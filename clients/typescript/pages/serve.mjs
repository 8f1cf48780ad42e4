// The team feed and live console pages, served for `make dev` and the
// browser test. No dependencies: node:http serves the pages, the client's
// ES modules (dist/esm), fresh client tokens (so the pages use getToken),
// and the team's members read through the cache API (the snapshot).
//
// Environment:
//   PAGES_ADDR                 listen address (default 127.0.0.1:8090)
//   HERALD_GATEWAY_WS          ws://…/v1/ws the pages connect to
//   HERALD_GATEWAY_JWT_SECRET  the HS256 key client tokens are signed with
//   HERALD_JWT_KID             its kid (default main, as deploy/herald.toml)
//   HERALD_TENANT              the team feed's tenant (default demo)
//   HERALD_OPS_TENANT          the ops tenant (default ops)
//   HERALD_CACHE_URL, HERALD_CACHE_TOKEN   the cache API, for /api/team/{id}
//   HERALD_TOKEN_TTL_S         client token lifetime (default 600)
import { createHmac, randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { createServer } from "node:http";
import { dirname, extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "..", "dist", "esm");
const types = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".map": "application/json" };

function sign(secret, kid, claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT", kid })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

/** Starts the server; resolves to { url, close() }. */
export async function startPages(env = process.env) {
  const secret = env.HERALD_GATEWAY_JWT_SECRET;
  if (!secret) throw new Error("HERALD_GATEWAY_JWT_SECRET is not set");
  const [host, port] = (env.PAGES_ADDR ?? "127.0.0.1:8090").split(":");
  const kid = env.HERALD_JWT_KID ?? "main";
  const tenant = env.HERALD_TENANT ?? "demo";
  const opsTenant = env.HERALD_OPS_TENANT ?? "ops";
  const ttl = Number(env.HERALD_TOKEN_TTL_S ?? 600);
  const cacheUrl = env.HERALD_CACHE_URL ?? "http://127.0.0.1:8080";

  const token = (kind, user) => {
    const now = Math.floor(Date.now() / 1000);
    const claims =
      kind === "ops"
        ? { tenant: opsTenant, sub: user, channels: ["ops:*"] }
        : { tenant, sub: user, channels: ["team:*"] };
    return sign(secret, kid, { ...claims, iat: now, exp: now + ttl });
  };

  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? "/", "http://pages");
    const send = (status, type, body) => {
      res.writeHead(status, { "content-type": type, "cache-control": "no-store" });
      res.end(body);
    };
    try {
      if (url.pathname === "/config.json") {
        return send(200, "application/json", JSON.stringify({ gateway: env.HERALD_GATEWAY_WS ?? "ws://127.0.0.1:8081/v1/ws", tenant }));
      }
      if (url.pathname === "/token/team" || url.pathname === "/token/ops") {
        const user = (url.searchParams.get("user") ?? `visitor-${randomBytes(2).toString("hex")}`).slice(0, 64);
        return send(200, "application/json", JSON.stringify({ token: token(url.pathname.slice(7), user) }));
      }
      const team = url.pathname.match(/^\/api\/team\/([0-9]{1,18})$/);
      if (team) {
        const upstream = await fetch(`${cacheUrl}/v1/t/${tenant}/r/team_members?team=${team[1]}`, {
          headers: { authorization: `Bearer ${env.HERALD_CACHE_TOKEN ?? ""}` },
        });
        return send(upstream.status, "application/json", await upstream.text());
      }
      let file;
      if (url.pathname.startsWith("/client/")) file = join(dist, normalize(url.pathname.slice(8)).replace(/^(\.\.[/\\])+/, ""));
      else if (url.pathname === "/") file = join(here, "index.html");
      else file = join(here, normalize(url.pathname).replace(/^(\.\.[/\\])+/, ""));
      if (!file.startsWith(here) && !file.startsWith(dist)) return send(404, "text/plain", "not found\n");
      return send(200, types[extname(file)] ?? "application/octet-stream", await readFile(file));
    } catch (error) {
      const missing = error && typeof error === "object" && "code" in error && error.code === "ENOENT";
      return send(missing ? 404 : 502, "text/plain", missing ? "not found\n" : `${String(error)}\n`);
    }
  });
  await new Promise((resolve) => server.listen(Number(port), host, resolve));
  const address = server.address();
  return {
    url: `http://${host}:${typeof address === "object" && address ? address.port : port}`,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const pages = await startPages();
  console.log(`[pages] team feed ${pages.url}/team-feed.html  live console ${pages.url}/console.html`);
}
