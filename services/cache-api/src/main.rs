//! `herald-cache-api`: the tenant-aware cache over gRPC and HTTP.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use herald_core::config::Config;

#[derive(Parser)]
#[command(version, about = "Herald's tenant-aware cache over gRPC and HTTP")]
struct Cli {
    /// TOML configuration file (environment overrides apply on top).
    #[arg(long, env = "HERALD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the cache API (the default).
    Run,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Command::Run = cli.command.unwrap_or(Command::Run);
    let config = Config::from_file(cli.config.as_deref()).context("failed to load configuration")?;
    herald_core::telemetry::announce("herald-cache-api run", &config);
    let _telemetry = herald_core::telemetry::init("herald-cache-api")?;
    let listeners = herald_cache_api::Listeners::bind(&config).await?;
    let shutdown = herald_core::shutdown::on_signal();
    herald_cache_api::run(config, listeners, herald_cache_api::Options::default(), shutdown).await
}
