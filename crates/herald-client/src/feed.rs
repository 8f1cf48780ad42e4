//! Follows cache-api's `Watch` stream and feeds [`Coherence`]: live after
//! `Ready`, and a flush on any doubt — the stream ends (whatever the status),
//! a transport error, a seq gap, a heartbeat of another generation, or no
//! message within the heartbeat timeout (a half-open connection). Then it
//! watches again after a jittered backoff, moving to the next endpoint when
//! the last attempt never got a `Ready`.

use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use herald_l1::backoff::Backoff;
use herald_proto::v1::WatchMessage;
use herald_proto::v1::watch_message::Body;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::state::{Coherence, Doubt};

/// A Watch stream's messages.
pub type Messages = BoxStream<'static, Result<WatchMessage, Status>>;

/// Where Watch streams come from (cache-api over gRPC; a fake in tests).
pub trait Source: Send + Sync + 'static {
    /// Opens a stream; `rotate`: the last one never became live, try
    /// another endpoint.
    fn open(&self, rotate: bool) -> BoxFuture<'static, Result<Messages, Status>>;
}

/// How the feed waits.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// No message for this long: flush (and the same bound on opening).
    pub heartbeat_timeout: Duration,
    /// First and longest delay between attempts.
    pub backoff: (Duration, Duration),
}

/// Runs the feed until `shutdown` fires.
pub async fn run(state: Coherence, source: impl Source, options: FeedOptions, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(options.backoff.0, options.backoff.1);
    let mut rotate = false;
    while !shutdown.is_cancelled() {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => break,
            opened = tokio::time::timeout(options.heartbeat_timeout, source.open(rotate)) => opened,
        };
        let reason = match opened {
            Ok(Ok(messages)) => {
                let (was_live, doubt) = follow(&state, messages, &options, &shutdown).await;
                if was_live {
                    backoff.reset();
                }
                rotate = !was_live;
                doubt
            }
            Ok(Err(status)) => {
                rotate = true;
                Doubt::Ended(format!("{}: {}", status.code(), status.message()))
            }
            Err(_) => {
                rotate = true;
                Doubt::Ended("opening the stream timed out".into())
            }
        };
        let was = state.is_live();
        state.doubt();
        if shutdown.is_cancelled() {
            break;
        }
        if was {
            tracing::warn!(%reason, "near cache flushed, watching again");
        } else {
            tracing::debug!(%reason, "near cache not live, watching again");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    state.doubt();
}

/// Follows one stream until a doubt; returns whether it became live.
async fn follow(
    state: &Coherence,
    mut messages: Messages,
    options: &FeedOptions,
    shutdown: &CancellationToken,
) -> (bool, Doubt) {
    let mut was_live = false;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return (was_live, Doubt::Ended("shutting down".into())),
            next = tokio::time::timeout(options.heartbeat_timeout, messages.next()) => next,
        };
        let message = match next {
            Err(_) => return (was_live, Doubt::Silence),
            Ok(None) => return (was_live, Doubt::Ended("OK".into())),
            Ok(Some(Err(status))) => {
                return (was_live, Doubt::Ended(format!("{}: {}", status.code(), status.message())));
            }
            Ok(Some(Ok(message))) => message,
        };
        // Tokio's clock (the same as std's, except in tests with paused time).
        let now = tokio::time::Instant::now().into_std();
        let applied = match message.body {
            Some(Body::Ready(ready)) if !was_live => {
                let lsn = ready.position.map_or(0, |p| p.commit_lsn);
                state.ready(&ready.node_id, ready.generation, lsn, now);
                state.freshness(ready.position.and_then(|p| p.staleness_ms), now);
                was_live = true;
                tracing::info!(node = %ready.node_id, generation = ready.generation, "near cache live");
                Ok(())
            }
            Some(Body::Events(events)) if was_live => state.events(events.seq, &events.events, now),
            Some(Body::Heartbeat(hb)) if was_live => {
                let applied = state.heartbeat(hb.generation, hb.seq, hb.position.map_or(0, |p| p.commit_lsn), now);
                if applied.is_ok() {
                    state.freshness(hb.position.and_then(|p| p.staleness_ms), now);
                }
                applied
            }
            // A message of a newer kind: nothing to do.
            None => continue,
            Some(_) => Err(Doubt::Ended("messages out of protocol order".into())),
        };
        if let Err(doubt) = applied {
            return (was_live, doubt);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use herald_proto::v1::watch_message::{Events, Heartbeat, Ready};
    use herald_proto::v1::{InvalidationEvent, WatchPosition};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;
    use crate::state::Answer;

    type Tx = mpsc::UnboundedSender<Result<WatchMessage, Status>>;

    /// Each `open` hands out the next stream the test prepared.
    #[derive(Clone, Default)]
    struct Fake {
        streams: Arc<Mutex<Vec<Messages>>>,
        opened: Arc<Mutex<usize>>,
    }

    impl Fake {
        fn prepare(&self) -> Tx {
            let (tx, rx) = mpsc::unbounded_channel();
            self.streams.lock().unwrap().push(UnboundedReceiverStream::new(rx).boxed());
            tx
        }
    }

    impl Source for Fake {
        fn open(&self, _rotate: bool) -> BoxFuture<'static, Result<Messages, Status>> {
            *self.opened.lock().unwrap() += 1;
            let next = { self.streams.lock().unwrap().pop() };
            Box::pin(async move {
                match next {
                    Some(s) => Ok(s),
                    None => futures::future::pending().await,
                }
            })
        }
    }

    fn msg(body: Body) -> Result<WatchMessage, Status> {
        Ok(WatchMessage { body: Some(body) })
    }
    fn ready(generation: u64) -> Result<WatchMessage, Status> {
        msg(Body::Ready(Ready { node_id: "a".into(), generation, position: None, heartbeat_ms: 500 }))
    }
    fn events(seq: u64, tag: &str) -> Result<WatchMessage, Status> {
        let event = InvalidationEvent { tenant: "acme".into(), tags: vec![tag.into()], ..Default::default() };
        msg(Body::Events(Events { seq, events: vec![event] }))
    }
    fn heartbeat(generation: u64, seq: u64) -> Result<WatchMessage, Status> {
        msg(Body::Heartbeat(Heartbeat { generation, seq, position: Some(WatchPosition::default()) }))
    }

    const TIMEOUT: Duration = Duration::from_millis(1_500);

    fn start(fake: &Fake) -> (Coherence, CancellationToken) {
        let state = Coherence::new(1 << 20, Duration::from_secs(60), TIMEOUT);
        let options = FeedOptions {
            heartbeat_timeout: TIMEOUT,
            backoff: (Duration::from_millis(50), Duration::from_millis(100)),
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(run(state.clone(), fake.clone(), options, shutdown.clone()));
        (state, shutdown)
    }

    /// Lets the feed task run until it waits again (time is paused).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn store(state: &Coherence, ticket: crate::state::Ticket, key: &str, generation: u64) -> bool {
        let tags = vec!["res_users.id=1".to_string()];
        let answer = Answer {
            tenant: "acme",
            global: false,
            value: Bytes::from_static(b"v"),
            tags: &tags,
            expires_at_ms: 0,
            node_id: "a",
            generation,
        };
        state.fill(ticket, key, answer)
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_between_ticket_and_answer_refuses_the_fill() {
        let fake = Fake::default();
        let tx = fake.prepare();
        let (state, _shutdown) = start(&fake);
        tx.send(ready(1)).unwrap();
        settle().await;
        assert!(state.is_live());
        let raced = state.ticket();
        tx.send(events(1, "res_users.id=1")).unwrap();
        settle().await;
        assert!(!store(&state, raced, "u1", 1), "the event passed the ticket");
        assert!(store(&state, state.ticket(), "u1", 1));
        assert!(state.get("u1").is_some());
        tx.send(events(2, "res_users.id=1")).unwrap();
        settle().await;
        assert!(state.get("u1").is_none(), "the event drops the stored entry");
        assert!(state.is_live());
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_silence_flushes_within_the_timeout_and_watches_again() {
        let fake = Fake::default();
        let second = fake.prepare();
        let first = fake.prepare();
        let (state, _shutdown) = start(&fake);
        first.send(ready(1)).unwrap();
        settle().await;
        assert!(store(&state, state.ticket(), "u1", 1));
        // Heartbeats keep it live past several timeouts.
        for _ in 0..4 {
            tokio::time::advance(Duration::from_millis(500)).await;
            first.send(heartbeat(1, 0)).unwrap();
            settle().await;
        }
        assert!(state.is_live() && state.get("u1").is_some());
        // Then nothing, though the connection stays open (half-open).
        tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
        settle().await;
        assert!(state.is_live(), "not before the timeout");
        tokio::time::advance(Duration::from_millis(2)).await;
        settle().await;
        assert!(!state.is_live(), "flushed at the timeout");
        assert_eq!(state.l1().entry_count(), 0);
        assert_eq!(state.l1().metrics().flushes.get(), 1);
        // Watches again after the backoff and is live on the new stream.
        second.send(ready(1)).unwrap();
        tokio::time::advance(Duration::from_millis(200)).await;
        settle().await;
        assert!(state.is_live());
        assert_eq!(*fake.opened.lock().unwrap(), 2);
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reported_staleness_plus_the_time_since_decides_whether_ram_answers() {
        let fake = Fake::default();
        let tx = fake.prepare();
        let state = Coherence::new(1 << 20, Duration::from_secs(60), TIMEOUT)
            .with_max_staleness(Some(Duration::from_millis(500)));
        let options = FeedOptions { heartbeat_timeout: TIMEOUT, backoff: (Duration::from_millis(50), TIMEOUT) };
        let shutdown = CancellationToken::new();
        tokio::spawn(run(state.clone(), fake.clone(), options, shutdown.clone()));
        let position = |ms| Some(WatchPosition { staleness_ms: Some(ms), ..Default::default() });
        let ready = Ready { node_id: "a".into(), generation: 1, position: position(100), heartbeat_ms: 500 };
        tx.send(msg(Body::Ready(ready))).unwrap();
        settle().await;
        assert!(store(&state, state.ticket(), "u1", 1));
        let now = || tokio::time::Instant::now().into_std();
        assert!(state.lookup("u1", now()).is_some(), "100 ms stale, bound 500");
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(state.lookup("u1", now()).is_some(), "500 ms stale: still within");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(state.lookup("u1", now()).is_none(), "501 ms stale");
        assert_eq!(state.stale_metrics().bypassed(crate::state::StaleCause::WatermarkBehind), 1);
        tx.send(msg(Body::Heartbeat(Heartbeat { generation: 1, seq: 0, position: position(50) }))).unwrap();
        settle().await;
        assert!(state.lookup("u1", now()).is_some(), "a fresh heartbeat: RAM answers again");
        tx.send(msg(Body::Heartbeat(Heartbeat { generation: 1, seq: 0, position: None }))).unwrap();
        settle().await;
        assert!(state.lookup("u1", now()).is_none(), "no staleness reported: nothing vouched for");
        assert!(state.is_live());
    }

    #[tokio::test(start_paused = true)]
    async fn a_seq_gap_flushes() {
        let fake = Fake::default();
        let tx = fake.prepare();
        let (state, _shutdown) = start(&fake);
        tx.send(ready(1)).unwrap();
        tx.send(events(1, "x")).unwrap();
        settle().await;
        assert!(store(&state, state.ticket(), "u1", 1));
        let in_flight = state.ticket();
        tx.send(events(3, "y")).unwrap();
        settle().await;
        assert!(!state.is_live());
        assert_eq!(state.l1().entry_count(), 0);
        assert!(!store(&state, in_flight, "u2", 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_generation_change_flushes() {
        let fake = Fake::default();
        let tx = fake.prepare();
        let (state, _shutdown) = start(&fake);
        tx.send(ready(1)).unwrap();
        settle().await;
        assert!(store(&state, state.ticket(), "u1", 1));
        tx.send(heartbeat(2, 0)).unwrap();
        settle().await;
        assert!(!state.is_live());
        assert!(state.get("u1").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_ends_flushes_whatever_its_status() {
        for end in [Some(Status::unavailable("flushed")), Some(Status::data_loss("behind")), None] {
            let fake = Fake::default();
            let tx = fake.prepare();
            let (state, _shutdown) = start(&fake);
            tx.send(ready(1)).unwrap();
            settle().await;
            assert!(store(&state, state.ticket(), "u1", 1));
            match end {
                Some(status) => tx.send(Err(status)).unwrap(),
                None => drop(tx),
            }
            settle().await;
            assert!(!state.is_live());
            assert_eq!(state.l1().entry_count(), 0);
        }
    }
}
