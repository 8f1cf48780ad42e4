/**
 * Publishing from an app server: `POST /v1/publish` with a service token.
 * Every call has an idempotency key (a random one unless given), so a retry
 * after a timeout, a 429 or a 5xx publishes at most once.
 */
import { Backoff } from "./backoff.js";

export interface PublisherOptions {
  /** The gateway's base URL, e.g. `http://gateway:8081`. */
  url: string;
  /** A service token (`gateway.service_tokens`). */
  token: string;
  /** Attempts in all (default 5). */
  attempts?: number;
  /** Per attempt (default 10 s). */
  timeoutMs?: number;
  fetch?: typeof fetch;
  minRetryDelayMs?: number;
  maxRetryDelayMs?: number;
}

export interface PublishRequest {
  tenant: string;
  channel: string;
  data: unknown;
  /** Same key → one publication (per channel, for an hour). Default: a random UUID for this call. */
  idempotencyKey?: string;
}

export interface PublishResult {
  offset: number;
  epoch: string;
  /** The key was seen before: nothing was published this time. */
  duplicate: boolean;
  /** Redis was down: only the gateway's own clients got it, and it is not in history. */
  localOnly: boolean;
}

/** The gateway refused the publication (4xx other than 429), or every attempt failed. */
export class PublishError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
    this.name = "PublishError";
  }
}

export class Publisher {
  private readonly fetchImpl: typeof fetch;

  constructor(private readonly options: PublisherOptions) {
    const f = options.fetch ?? globalThis.fetch;
    if (!f) throw new Error("Publisher: no fetch (Node ≥ 18 has one)");
    this.fetchImpl = f;
  }

  async publish(request: PublishRequest): Promise<PublishResult> {
    const key = request.idempotencyKey ?? globalThis.crypto.randomUUID();
    const body = JSON.stringify({ tenant: request.tenant, channel: request.channel, data: request.data, idempotency_key: key });
    const attempts = this.options.attempts ?? 5;
    const backoff = new Backoff(this.options.minRetryDelayMs ?? 200, this.options.maxRetryDelayMs ?? 5_000);
    let last: PublishError = new PublishError("not attempted", 0);
    for (let attempt = 1; attempt <= attempts; attempt++) {
      const outcome = await this.attempt(body);
      if ("result" in outcome) return outcome.result;
      last = outcome.error;
      // 429 and 5xx are worth retrying with the same key; other refusals are not.
      const retryable = last.status === 0 || last.status === 429 || last.status >= 500;
      if (!retryable) throw last;
      if (attempt < attempts) await new Promise((resolve) => setTimeout(resolve, backoff.next()));
    }
    throw last;
  }

  /** One POST; a network error or timeout is status 0. */
  private async attempt(body: string): Promise<{ result: PublishResult } | { error: PublishError }> {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.options.timeoutMs ?? 10_000);
    try {
      const response = await this.fetchImpl(new URL("/v1/publish", this.options.url), {
        method: "POST",
        headers: { authorization: `Bearer ${this.options.token}`, "content-type": "application/json" },
        body,
        signal: controller.signal,
      });
      const text = await response.text();
      if (response.status === 200 || response.status === 202) {
        const r = JSON.parse(text) as { offset: number; epoch: string; duplicate: boolean; local_only: boolean };
        return { result: { offset: r.offset, epoch: r.epoch, duplicate: r.duplicate, localOnly: r.local_only } };
      }
      return { error: new PublishError(`publish: HTTP ${response.status}: ${errorText(text)}`, response.status) };
    } catch (error) {
      return { error: new PublishError(`publish: ${String(error)}`, 0) };
    } finally {
      clearTimeout(timer);
    }
  }
}

function errorText(text: string): string {
  try {
    const parsed = JSON.parse(text) as { error?: unknown };
    return typeof parsed.error === "string" ? parsed.error : text;
  } catch {
    return text;
  }
}
