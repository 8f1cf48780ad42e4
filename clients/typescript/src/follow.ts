/**
 * `loadThenFollow`: subscribe, buffer the publications, fetch a snapshot of
 * the state, then apply the buffer — and do it again whenever the
 * subscription says history could not fill a gap (`onReload`). The app sees
 * a snapshot followed by every change after it.
 *
 * Exactly once: when `fetchSnapshot` returns the channel position its
 * snapshot is current at (`{ snapshot, position }`), buffered publications
 * at or before it are dropped. Without a position every buffered
 * publication is applied after the snapshot, so a change may be seen in the
 * snapshot and again as a publication (harmless for Herald's row-change
 * events, which name rows to re-read).
 */
import { Backoff } from "./backoff.js";
import type { Herald } from "./client.js";
import type { StreamPosition } from "./protocol.js";
import type { Publication, SubscribedContext, Subscription } from "./subscription.js";

export interface Snapshot<S> {
  snapshot: S;
  position?: StreamPosition;
}

export interface FollowOptions<S, T> {
  /** Reads the current state from your API (called after the subscription is live). */
  fetchSnapshot: () => Promise<S | Snapshot<S>>;
  /** The state to render from (first load and every reload). */
  onSnapshot: (snapshot: S) => void;
  /** A change after the snapshot, in order. */
  onPublication: (publication: Publication<T>) => void;
  onRecovered?: (context: SubscribedContext) => void;
  onError?: (error: Error) => void;
}

export interface Follower<T> {
  subscription: Subscription<T>;
  /** Resolves after the first snapshot was applied. */
  loaded: Promise<void>;
  stop(): void;
}

export function loadThenFollow<S, T = unknown>(
  client: Herald,
  channel: string,
  options: FollowOptions<S, T>,
): Follower<T> {
  let loading = true;
  let buffer: Publication<T>[] = [];
  let generation = 0;
  let stopped = false;
  let resolveLoaded!: () => void;
  const loaded = new Promise<void>((resolve) => (resolveLoaded = resolve));
  const backoff = new Backoff(500, 10_000);

  const load = async (): Promise<void> => {
    const mine = ++generation;
    loading = true;
    buffer = [];
    for (;;) {
      try {
        const result = await options.fetchSnapshot();
        if (mine !== generation || stopped) return;
        const { snapshot, position } = asSnapshot(result);
        options.onSnapshot(snapshot);
        const pending = buffer;
        buffer = [];
        loading = false;
        backoff.reset();
        for (const pub of pending) {
          if (position && pub.epoch === position.epoch && pub.offset !== 0 && pub.offset <= position.offset) continue;
          options.onPublication(pub);
        }
        resolveLoaded();
        return;
      } catch (error) {
        if (mine !== generation || stopped) return;
        options.onError?.(error instanceof Error ? error : new Error(String(error)));
        await new Promise((resolve) => setTimeout(resolve, backoff.next()));
        if (mine !== generation || stopped) return;
      }
    }
  };

  let first = true;
  const subscription = client.subscribe<T>(channel, {
    onSubscribed: () => {
      if (first) {
        first = false;
        void load();
      }
    },
    onReload: () => void load(),
    onRecovered: (context) => options.onRecovered?.(context),
    onPublication: (pub) => {
      if (loading) buffer.push(pub);
      else options.onPublication(pub);
    },
  });
  return {
    subscription,
    loaded,
    stop: () => {
      stopped = true;
      subscription.unsubscribe();
    },
  };
}

function asSnapshot<S>(value: S | Snapshot<S>): Snapshot<S> {
  if (typeof value === "object" && value !== null && "snapshot" in value) return value as Snapshot<S>;
  return { snapshot: value as S };
}
