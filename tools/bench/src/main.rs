//! postbox-bench: throughput, latency and memory of real worker processes
//! against a real PostgreSQL, with the receiver in a process of its own so it
//! never shares a runtime (or a CPU budget it cannot see) with a worker.
//!
//! Scenarios, each in a fresh database that is dropped afterwards:
//!
//! - **drain**: `--events` events over `--endpoints` callback URLs are
//!   enqueued first (endpoint limits raised), then 1, 2, … processes of
//!   `postbox worker --until-empty` start; events/s = events ÷ the time from
//!   starting the workers until the last one exits.
//! - **drain, slow receiver**: the same, with a receiver that waits
//!   `--delay-ms` before answering, to show concurrent deliveries.
//! - **latency**: one worker runs while the bench enqueues at a steady rate,
//!   one event per transaction; latency = arrival at the receiver − the
//!   moment COMMIT returned (both wall clocks of this machine).
//!
//! Peak RSS is `VmHWM` from `/proc/<pid>/status`, polled while each worker
//! runs. CPU use is read from `/proc` as well. Every run checks that the
//! receiver saw every event id and that every row is `delivered`; a run that
//! loses an event fails (exit 1).
//!
//! Run from the repository root (it starts the `postbox` binary built next
//! to it, or `POSTBOX_BIN`):
//!
//! ```sh
//! cargo build --release --workspace
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   target/release/postbox-bench --events 20000 --endpoints 10 --workers 1,2
//! ```

#![forbid(unsafe_code)]

mod bench;
mod db;
mod procfs;
mod receiver;
mod report;
mod verify;
mod workers;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Measures real postbox workers against a real PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "postbox-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: bench::BenchArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The receiver process (started by the benchmark itself).
    #[command(hide = true)]
    Receiver(bench::ReceiverArgs),
}

/// Why the benchmark stopped.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage: exit 2.
    Usage(String),
    /// Something failed while running (or an event was lost): exit 1.
    Runtime(String),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Runtime(format!("database error: {e}"))
    }
}

impl From<postbox::MigrateError> for Failure {
    fn from(e: postbox::MigrateError) -> Self {
        Failure::Runtime(e.to_string())
    }
}

/// A pool of `size` connections to `url`.
pub async fn connect(url: &str, size: u32) -> Result<PgPool, Failure> {
    PgPoolOptions::new()
        .max_connections(size)
        .connect(url)
        .await
        .map_err(|e| Failure::Runtime(format!("cannot connect to the benchmark database: {e}")))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Receiver(a)) => receiver::receiver(a).await,
        None => bench::run(cli.bench).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("postbox-bench: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("postbox-bench: {m}");
            ExitCode::FAILURE
        }
    }
}
