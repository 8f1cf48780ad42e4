// The TypeScript client as a subscriber for `herald-bench ws --client ts`.
// Started by the benchmark; speaks its line protocol on stdin/stdout:
//   args: --gateways host:port,… --token T --channel team:x --count N [--source 127.0.0.x]
//   prints READY <subscribed> once every client is subscribed, then on a
//   stdin line `DONE <publications>` waits for them (60 s at most) and prints
//   RESULT {"lat":[[µs,count],…],"received","expected","lost","duplicates","failed"}.
// Each subscriber is one `Herald` client (its own socket). A publication's
// data is {"t": <publish time, µs since the epoch>, "p": <phase>}; latency is
// measured when `onPublication` runs, so it includes the client's own checks.
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import WebSocket from "ws";

import { Herald } from "../dist/esm/index.js";

const { values } = parseArgs({
  options: {
    gateways: { type: "string" },
    token: { type: "string" },
    channel: { type: "string" },
    count: { type: "string" },
    source: { type: "string", default: "127.0.0.1" },
  },
});
const gateways = values.gateways.split(",");
const count = Number(values.count);
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

class BoundSocket extends WebSocket {
  constructor(url) {
    super(url, { localAddress: values.source, perMessageDeflate: false });
  }
}

const latencies = new Map(); // µs rounded to 10 → count
let received = 0;
let duplicates = 0;
let failed = 0;
const seen = []; // per subscriber: offsets delivered to the application

const clients = [];
const subscribing = [];
for (let i = 0; i < count; i++) {
  const offsets = new Set();
  seen.push(offsets);
  const client = new Herald(`ws://${gateways[i % gateways.length]}/v1/ws`, { token: values.token, websocket: BoundSocket, network: null });
  const sub = client.subscribe(values.channel, {
    onPublication: ({ data, offset }) => {
      const latency = Math.max(0, nowUs() - data.t);
      const bucket = Math.floor(latency / 10) * 10;
      latencies.set(bucket, (latencies.get(bucket) ?? 0) + 1);
      if (offsets.has(offset)) duplicates += 1;
      offsets.add(offset);
      received += 1;
    },
  });
  client.connect();
  clients.push(client);
  subscribing.push(
    sub.ready(120_000).catch((error) => {
      failed += 1;
      process.stderr.write(`subscriber ${i}: ${error}\n`);
    }),
  );
  // Do not open a thousand upgrades in one tick.
  if (i % 100 === 99) await Promise.all(subscribing.slice(-100));
}
await Promise.all(subscribing);
console.log(`READY ${count - failed}`);

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.startsWith("DONE")) continue;
  const publications = Number(line.split(/\s+/)[1] ?? 0);
  const expected = (count - failed) * publications;
  const deadline = Date.now() + 60_000;
  while (received < expected && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  // Lost: publications 1…n of the channel a subscriber never saw.
  let lost = 0;
  for (const offsets of seen) {
    if (offsets.size === 0 && failed > 0) continue;
    lost += Math.max(0, publications - offsets.size);
  }
  const lat = [...latencies.entries()].sort((a, b) => a[0] - b[0]);
  console.log(`RESULT ${JSON.stringify({ lat, received, expected, lost, duplicates, failed })}`);
  for (const client of clients) client.disconnect();
  break;
}
process.exit(0);
