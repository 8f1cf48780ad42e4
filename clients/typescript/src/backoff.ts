/**
 * Full-jitter exponential backoff: the n-th retry waits a uniformly random
 * time in [0, min(max, base · 2^n)], so clients of a failed node spread out
 * instead of arriving together.
 */
export class Backoff {
  private attempt = 0;

  constructor(
    readonly baseMs = 500,
    readonly maxMs = 20_000,
    private readonly random: () => number = Math.random,
  ) {}

  /** The ceiling of the next delay, before jitter. */
  ceiling(): number {
    // 2^attempt overflows nothing: the exponent stops growing at the cap.
    return Math.min(this.maxMs, this.baseMs * 2 ** Math.min(this.attempt, 30));
  }

  /** The next delay, milliseconds. */
  next(): number {
    const delay = Math.floor(this.random() * this.ceiling());
    this.attempt += 1;
    return delay;
  }

  reset(): void {
    this.attempt = 0;
  }

  get attempts(): number {
    return this.attempt;
  }
}
