//! `herald-gateway`: the WebSocket gateway and its publish API.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use herald_core::config::Config;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(version, about = "Herald's WebSocket gateway: team channels with auth, history, recovery and a publish API")]
struct Cli {
    /// TOML configuration file (environment overrides apply on top).
    #[arg(long, env = "HERALD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket clients and the publish API (the default).
    Run,
}

async fn bind(what: &str, addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("failed to bind {what} {addr}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let Command::Run = cli.command.unwrap_or(Command::Run);
    let config = Config::from_file(cli.config.as_deref()).context("failed to load configuration")?;
    let _telemetry = herald_core::telemetry::init("herald-gateway")?;
    let g = &config.gateway;
    let listeners = herald_gateway::Listeners {
        http: bind("gateway.listen_addr", &g.listen_addr).await?,
        grpc: Some(bind("gateway.grpc_addr", &g.grpc_addr).await?),
        ops: bind("gateway.ops_addr", &g.ops_addr).await?,
    };
    herald_gateway::run(config, listeners, herald_core::shutdown::on_signal()).await
}
