//! `herald-broadcast`: apply the event log, or watch the L1 channel.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use herald_core::config::Config;

#[derive(Parser)]
#[command(version, about = "Herald's event log into L2 deletes and L1 invalidations")]
struct Cli {
    /// TOML configuration file (environment overrides apply on top).
    #[arg(long, env = "HERALD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the event stream (the default).
    Run,
    /// Print each invalidation published on the L1 channel as a JSON line.
    Watch {
        /// Print heartbeats too.
        #[arg(long)]
        heartbeats: bool,
    },
}

/// One thread, as capture: broadcast's work is a chain of small steps (read
/// a batch, apply it to L2, publish to L1 holders, acknowledge), each handed
/// to the next task. On one thread those hand-offs are queue pushes instead
/// of wake-ups across worker threads, and nothing broadcast does blocks a
/// thread. Instances scale by joining the consumer group, not by threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_file(cli.config.as_deref()).context("failed to load configuration")?;
    let shutdown = herald_core::shutdown::on_signal();
    let command = cli.command.unwrap_or(Command::Run);
    let name = match command {
        Command::Run => "herald-broadcast run",
        Command::Watch { .. } => "herald-broadcast watch",
    };
    herald_core::telemetry::announce(name, &config);
    match command {
        Command::Run => {
            let _telemetry = herald_core::telemetry::init("herald-broadcast")?;
            let listener = tokio::net::TcpListener::bind(&config.broadcast.ops_addr)
                .await
                .with_context(|| format!("failed to bind broadcast.ops_addr {}", config.broadcast.ops_addr))?;
            let consumer = herald_broadcast::consumer_name(&config.broadcast, |v| std::env::var(v).ok());
            herald_broadcast::run(config, listener, consumer, shutdown).await
        }
        Command::Watch { heartbeats } => herald_broadcast::watch::watch(&config, heartbeats, shutdown).await,
    }
}
