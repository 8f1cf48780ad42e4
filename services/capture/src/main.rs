//! `herald-capture`: run capture, install its schema, or show its status.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use herald_core::config::Config;

#[derive(Parser)]
#[command(version, about = "Postgres changes into Herald's durable event log")]
struct Cli {
    /// TOML configuration file (environment overrides apply on top).
    #[arg(long, env = "HERALD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Drain the outbox into the event stream (the default).
    Run,
    /// Install or update the herald schema and the triggers of the configured tables.
    Install {
        /// Print the SQL instead of applying it.
        #[arg(long)]
        print: bool,
    },
    /// Print outbox depth, oldest pending age and the last appended event;
    /// fails when the herald schema is not installed.
    Status,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_file(cli.config.as_deref()).context("failed to load configuration")?;
    let command = cli.command.unwrap_or(Command::Run);
    match command {
        Command::Run => herald_core::telemetry::announce("herald-capture run", &config),
        Command::Install { print: false } => herald_core::telemetry::announce("herald-capture install", &config),
        Command::Install { print: true } => {}
        Command::Status => herald_core::telemetry::announce("herald-capture status", &config),
    }
    match command {
        Command::Run => {
            let _telemetry = herald_core::telemetry::init("herald-capture")?;
            let listener = tokio::net::TcpListener::bind(&config.capture.ops_addr)
                .await
                .with_context(|| format!("failed to bind capture.ops_addr {}", config.capture.ops_addr))?;
            let shutdown = herald_core::shutdown::on_signal();
            herald_capture::run(config, listener, shutdown).await
        }
        Command::Install { print: true } => {
            print!("{}", herald_capture::schema::full_sql(&config.tables, &config.capture));
            Ok(())
        }
        Command::Install { print: false } => {
            let (mut client, connection) = tokio_postgres::connect(&config.postgres.url, tokio_postgres::NoTls)
                .await
                .context("failed to connect to postgres")?;
            tokio::spawn(connection);
            let report = herald_capture::install::install(&mut client, &config).await?;
            println!("herald schema version {} installed", herald_capture::schema::SCHEMA_VERSION);
            for table in &report.tables {
                println!("  watching {table}");
            }
            for trigger in &report.removed_triggers {
                println!("  removed trigger {trigger} (table no longer configured)");
            }
            for function in &report.removed_functions {
                println!("  removed function herald.{function} (no trigger uses it)");
            }
            Ok(())
        }
        Command::Status => {
            let status = herald_capture::status::status(&config).await?;
            if !status.installed {
                anyhow::bail!(
                    "the herald schema is not installed in {}: run `herald-capture install` with the same \
                     configuration, or point --config / HERALD_CONFIG / DATABASE_URL at the database Herald uses",
                    herald_core::telemetry::redact_url(&config.postgres.url)
                );
            }
            print!("{}", status.render());
            Ok(())
        }
    }
}
