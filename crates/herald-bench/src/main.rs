//! Herald's benchmark programs: each subcommand runs one benchmark against
//! real Postgres and Redis, prints a table, then a single JSON line last.

mod cache;
mod coherence;
mod invalidation;
mod models;
mod near;
mod procstat;
mod report;
mod ws;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "herald-bench", about = "Herald benchmarks (DATABASE_URL and REDIS_URL select the servers)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Commit → L1 invalidation latency, and what capture costs writers.
    Invalidation(invalidation::Args),
    /// Cache API Get per layer against direct Redis and Postgres; stampede.
    Cache(cache::Args),
    /// In-process near-cache hits against gRPC Get and Redis GET; commit → near-cache drop.
    NearCache(near::Args),
    /// Stale reads under writes and faults, per phase.
    Coherence(coherence::Args),
    /// Write paths of the cache models: write-through against a direct Postgres write.
    Models(models::Args),
    /// WebSocket fan-out: sockets held, memory per socket, deliveries/s, broadcast latency.
    Ws(ws::Args),
    #[command(hide = true)]
    WsNode(ws::NodeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr so that stdout ends with the JSON line.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("HERALD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Invalidation(args) => invalidation::run(args).await,
            Command::Cache(args) => cache::run(args).await,
            Command::NearCache(args) => near::run(args).await,
            Command::Coherence(args) => coherence::run(args).await,
            Command::Models(args) => models::run(args).await,
            Command::Ws(args) => ws::run(args).await,
            Command::WsNode(args) => ws::node(args).await,
        }
    })
}
