//! `--redis-cluster`: the latency run and the burst again on a Redis Cluster
//! of their own (3 masters with a replica each, `--partitions` log
//! partitions, capture and broadcast waiting for one replica, as a cluster
//! with replicas should run), with the same offered load and the same
//! capture source as the single-Redis run, on the same Postgres.

use herald_tests::process::ChildService;
use herald_tests::redis_cluster::RedisCluster;
use herald_tests::{Sandbox, Source, cluster_settings};

use super::latency::{Burst, LatencyOutcome, burst_run, latency_run};
use super::{Args, CaptureProcess, LATENCY_TABLE, production_timings, table_sql, watched};

/// What the cluster run measured.
pub(super) struct ClusterRun {
    pub(super) latency: LatencyOutcome,
    pub(super) burst: Burst,
}

pub(super) async fn run(admin: String, source: Source, args: &Args) -> anyhow::Result<ClusterRun> {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3)).await?;
    let url = cluster.url();
    let partitions = args.partitions;
    let mut sandbox = Sandbox::start_at(admin, source, |c| {
        production_timings(c);
        cluster_settings(c, url);
        c.redis.partitions = partitions;
    })
    .await;
    let result = measure(&mut sandbox, args).await;
    sandbox.cleanup().await;
    drop(cluster);
    result
}

async fn measure(sandbox: &mut Sandbox, args: &Args) -> anyhow::Result<ClusterRun> {
    sandbox.sql(&table_sql(LATENCY_TABLE)).await;
    sandbox.config.tables = vec![watched(LATENCY_TABLE)];
    sandbox.install().await;
    let capture = CaptureProcess::spawn(sandbox)?;
    capture.ready().await?;
    let broadcast = ChildService::spawn("herald-broadcast", &sandbox.config);
    let (a, b) = (sandbox.l1().await, sandbox.l1().await);
    eprintln!(
        "latency on the cluster ({} partitions): {} commits/s for {} s, {} writers",
        args.partitions, args.rate, args.seconds, args.writers
    );
    let url = sandbox.config.postgres.url.clone();
    let mut latency = latency_run(&url, args, [&a.cache, &b.cache], capture.ops).await?;
    latency.flushes = [a.cache.metrics().flushes.get(), b.cache.metrics().flushes.get()];
    eprintln!("burst on the cluster");
    let burst = burst_run(&url, [&a.cache, &b.cache], BURST_WRITERS, args.burst_commits / BURST_WRITERS as u64).await?;
    broadcast.stop().await;
    capture.child.kill().await;
    Ok(ClusterRun { latency, burst })
}

/// Writer connections of a burst.
pub(super) const BURST_WRITERS: usize = 16;
