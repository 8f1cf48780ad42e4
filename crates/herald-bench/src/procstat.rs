//! What the benchmarks read about processes: CPU time from `/proc` and the
//! Redis server's pid, so CPU splits can name every process on the path.

use anyhow::Context as _;
use fred::prelude::*;

/// CPU seconds (user + system) process `pid` has used so far, if it exists.
/// Linux counts them in clock ticks of 1/100 s.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) start after ')';
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// The pid of the Redis server behind `redis` (same machine only).
pub async fn redis_pid(redis: &Pool) -> anyhow::Result<u32> {
    let info: String = redis.next().info(Some(fred::types::InfoKind::Server)).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .context("redis INFO has no process_id")
}
