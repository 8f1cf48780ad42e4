//! `herald-capture`: run capture, install its schema, or show its status.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use herald_capture::source::Source;
use herald_core::config::{CaptureSource, Config};

async fn connect(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&config.postgres.url, tokio_postgres::NoTls)
        .await
        .context("failed to connect to postgres")?;
    tokio::spawn(connection);
    Ok(client)
}

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
    /// Capture changes into the event stream (the default).
    Run,
    /// Install or update the herald schema and the capture objects of the
    /// configured tables: with the WAL source a publication, two row
    /// triggers per table and the replication slot; with the outbox source
    /// statement triggers.
    Install {
        /// Print the SQL instead of applying it (the WAL source's unless
        /// capture.source = "outbox").
        #[arg(long)]
        print: bool,
    },
    /// Remove the capture triggers and the publication. A replication slot
    /// nobody reads keeps every WAL segment from now on: pass --drop-slot
    /// unless another install will read it again soon.
    Uninstall {
        /// Drop the replication slot too.
        #[arg(long)]
        drop_slot: bool,
    },
    /// Print the source, the replication slot (retained WAL, confirmed LSN,
    /// lag, streaming backend) or the outbox depth, and the last appended
    /// event; fails when the herald schema is not installed.
    Status,
}

/// One thread: capture's work is a chain of small steps (a replication
/// message, an event, an append), each handed to the next task. On one
/// thread those hand-offs are queue pushes; across worker threads each was
/// a wake-up and a context switch, which was most of capture's CPU per
/// commit under write load (a `perf` profile of `herald-bench
/// invalidation`). Nothing capture does blocks a thread.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_file(cli.config.as_deref()).context("failed to load configuration")?;
    let command = cli.command.unwrap_or(Command::Run);
    match command {
        Command::Run => herald_core::telemetry::announce("herald-capture run", &config),
        Command::Install { print: false } => herald_core::telemetry::announce("herald-capture install", &config),
        Command::Install { print: true } => {}
        Command::Uninstall { .. } => herald_core::telemetry::announce("herald-capture uninstall", &config),
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
            let source = match config.capture.source {
                CaptureSource::Outbox => Source::Outbox,
                CaptureSource::Wal | CaptureSource::Auto => Source::Wal,
            };
            if config.capture.source == CaptureSource::Auto {
                println!(
                    "-- capture.source = auto: this is the WAL source's SQL, installed when the database has \
                     wal_level = logical and the role may replicate (else the outbox's: set source = \"outbox\" to see it)"
                );
            }
            // The update trigger compares columns by type: read them when the
            // database is reachable, else show the all-text form (always correct).
            let catalog = match connect(&config).await {
                Ok(client) => herald_capture::install::column_types(&client, &config).await?,
                Err(error) => {
                    println!("-- database not reachable ({error:#}): columns compared as text");
                    Default::default()
                }
            };
            print!("{}", herald_capture::install::sql(&config, source, &catalog));
            Ok(())
        }
        Command::Install { print: false } => {
            let mut client = connect(&config).await?;
            let report = herald_capture::install::install(&mut client, &config).await?;
            println!(
                "herald schema version {} installed, source {}",
                herald_capture::schema::SCHEMA_VERSION,
                report.source.as_str()
            );
            if let Some(slot) = &report.slot {
                let what = match (slot.created, slot.lost) {
                    (_, true) => "was lost and is recreated: capture will flush every cache once",
                    (true, false) => "created",
                    (false, false) => "exists",
                };
                println!(
                    "  replication slot {} {what} (a slot nobody reads pins WAL forever: \
                     `herald-capture uninstall --drop-slot` removes it)",
                    config.capture.slot
                );
            }
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
        Command::Uninstall { drop_slot } => {
            let mut client = connect(&config).await?;
            let report = herald_capture::install::uninstall(&mut client, &config, drop_slot).await?;
            println!(
                "removed {} capture trigger(s) and publication {}",
                report.removed_triggers, config.capture.publication
            );
            if report.slot_dropped {
                println!("dropped replication slot {}", config.capture.slot);
            }
            if report.slot_kept {
                eprintln!(
                    "warning: replication slot {} still exists and keeps every WAL segment from now on; \
                     run `herald-capture uninstall --drop-slot` unless capture will read it again soon",
                    config.capture.slot
                );
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
