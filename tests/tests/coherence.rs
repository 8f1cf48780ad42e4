//! The coherence checker, slim: a few seconds of steady state and one fault
//! (broadcast SIGKILLed and restarted) with capture, broadcast and two
//! cache-api nodes as real processes, and a near cache on each node. Fails
//! on any stale value after quiesce, in any layer or near cache. The full run with every fault is
//! `cargo run --release -p herald-bench -- coherence`.

use std::time::Duration;

use herald_tests::Source;
use herald_tests::coherence::{Fault, Settings, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_value_survives_quiesce_in_steady_state_or_after_a_broadcast_crash() {
    no_stale_value(Source::Outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_value_survives_quiesce_in_steady_state_or_after_a_broadcast_crash_from_the_wal() {
    no_stale_value(Source::Wal).await;
}

async fn no_stale_value(source: Source) {
    let settings = Settings { rows: 30, writers: 2, readers: 4, source, ..Settings::default() };
    let mut world = World::start(settings).await;
    let mut reports = Vec::new();
    for (fault, seconds) in [(Fault::Steady, 3), (Fault::Broadcast, 4)] {
        reports.push(world.run_phase(fault, Duration::from_secs(seconds)).await);
    }
    world.stop().await;
    for r in &reports {
        eprintln!("{r:?}");
        assert!(r.reads > 100 && r.writes > 20, "{}: too little traffic to judge: {r:?}", r.phase);
        assert_eq!(r.stale_after_quiesce, 0, "{}: stale values after quiesce: {:?}", r.phase, r.examples);
        assert!(r.near_reads > 20, "{}: too few near-cache reads to judge: {r:?}", r.phase);
        assert_eq!(r.near_stale_after_quiesce, 0, "{}: near caches stale after quiesce: {:?}", r.phase, r.examples);
    }
}
