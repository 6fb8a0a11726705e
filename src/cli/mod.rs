//! The command line: `postbox <command>`. Every flag can also be set by an
//! environment variable (and a `.env` file). Configuration errors exit 2,
//! naming the variable; runtime errors exit 1.

mod admin;
mod demo;
mod endpoint;
mod inspect;
mod listen;
mod metrics_server;
mod probe;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postbox::ConfigError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Delivers signed webhooks for message events out of a PostgreSQL outbox.
#[derive(Debug, Parser)]
#[command(name = "postbox", version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "POSTBOX_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(flatten)]
    db: DbArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the database migrations (idempotent).
    Migrate,
    /// Deliver webhooks until SIGTERM/SIGINT.
    Worker(Box<worker::WorkerArgs>),
    /// Enqueue one test message event.
    Enqueue(admin::EnqueueArgs),
    /// Backlog by status, oldest pending age, failing endpoints.
    Status(admin::StatusArgs),
    /// Put failed (or chosen) events back to pending.
    Replay(admin::ReplayArgs),
    /// List, disable, enable, test an endpoint; set its secret, limits and retry policy.
    Endpoint(endpoint::EndpointArgs),
    /// Look at events: `event show ID` prints one event's story.
    Event(inspect::EventArgs),
    /// Signing secrets: `secret new` prints a fresh `whsec_…`.
    Secret(admin::SecretArgs),
    /// A local receiver for development: prints and verifies each webhook.
    Listen(listen::ListenArgs),
    /// The whole flow on one machine with no set-up.
    Demo(demo::DemoArgs),
}

/// The database connection, for every command that needs one. It is a global
/// option: `postbox --database-url … endpoint list` and
/// `postbox endpoint list --database-url …` mean the same.
#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
}

impl DbArgs {
    /// Connects a pool of `size` connections.
    pub async fn connect(&self, size: u32) -> Result<PgPool, Failure> {
        let url = self.database_url.as_deref().filter(|u| !u.is_empty()).ok_or_else(|| {
            Failure::Config(ConfigError::new(
                "DATABASE_URL",
                "is required (e.g. postgres://user@host/db)",
            ))
        })?;
        connect(url, size).await
    }
}

/// Connects to `url` with `size` connections. One connection is made first,
/// so an unreachable or misconfigured database is reported at once with its
/// real cause, naming `DATABASE_URL` (without its password).
pub async fn connect(url: &str, size: u32) -> Result<PgPool, Failure> {
    use sqlx::ConnectOptions;
    let opts: PgConnectOptions = url.parse().map_err(|e| {
        Failure::Config(ConfigError::new(
            "DATABASE_URL",
            format!("is not a PostgreSQL URL: {e}"),
        ))
    })?;
    let opts = without_tls_on_loopback(url, std::env::var_os("PGSSLMODE").is_some(), opts).application_name("postbox");
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), opts.connect()).await;
    match first {
        Ok(Ok(conn)) => drop(conn),
        Ok(Err(e)) => return Err(connect_failure(url, &e)),
        Err(_) => {
            return Err(Failure::Runtime(format!(
                "cannot connect to the database at DATABASE_URL={}: no answer within 10s",
                redact(url)
            )))
        }
    }
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(|e| connect_failure(url, &e))
}

/// Connections to this machine's own server skip TLS unless asked for.
///
/// Without an `sslmode` (in the URL or `PGSSLMODE`), sqlx, like libpq,
/// uses `prefer`: TLS when the server offers it, with no certificate
/// check. On a loopback address that protects nothing (the bytes never
/// leave the machine, and an unverified certificate proves nothing about
/// who listens there) and costs every round trip an encryption and a
/// decryption on both sides: 3–5 % of a drain here (docs/performance.md).
/// So a loopback host (`localhost`, 127.0.0.0/8, `::1`) with no `sslmode`
/// connects in plain text; any `sslmode` that is given, and every other
/// host, is left as it is.
fn without_tls_on_loopback(url: &str, sslmode_in_env: bool, opts: PgConnectOptions) -> PgConnectOptions {
    let asked = url::Url::parse(url).is_ok_and(|u| {
        u.query_pairs()
            .any(|(k, _)| k.eq_ignore_ascii_case("sslmode") || k.eq_ignore_ascii_case("ssl-mode"))
    });
    let host = opts.get_host().trim_start_matches('[').trim_end_matches(']');
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback && !asked && !sslmode_in_env {
        opts.ssl_mode(sqlx::postgres::PgSslMode::Disable)
    } else {
        opts
    }
}

/// `url` with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparsable URL)".into(),
    }
}

/// Says why a connection failed and what to check. Authentication and an
/// unknown database are configuration errors (exit 2); an unreachable server
/// may come back (exit 1).
fn connect_failure(url: &str, e: &sqlx::Error) -> Failure {
    let at = format!("DATABASE_URL={}", redact(url));
    let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
    let config = |why: String| Failure::Config(ConfigError::new("DATABASE_URL", why));
    match (code.as_deref(), e) {
        (Some("28P01" | "28000"), _) => config(format!(
            "authentication failed for {}: check the user and password ({e})",
            redact(url)
        )),
        (Some("3D000"), _) => config(format!(
            "names a database that does not exist ({}): create it or fix the name",
            redact(url)
        )),
        (_, sqlx::Error::Io(io)) => {
            let why = match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "connection refused: is PostgreSQL running and listening on that host and port?".to_string()
                }
                _ if io.to_string().contains("lookup") || io.to_string().contains("resolve") => {
                    format!("unknown host ({io})")
                }
                _ => io.to_string(),
            };
            Failure::Runtime(format!("cannot connect to the database at {at}: {why}"))
        }
        _ => Failure::Runtime(format!("cannot connect to the database at {at}: {e}")),
    }
}

/// How a command failed.
#[derive(Debug)]
pub enum Failure {
    /// Bad configuration or input: exit 2.
    Config(ConfigError),
    /// Bad usage with a message: exit 2.
    Usage(String),
    /// Something failed while running: exit 1.
    Runtime(String),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        let code = e.as_database_error().and_then(|d| d.code());
        if matches!(code.as_deref(), Some("42P01" | "3F000" | "42883")) && e.to_string().contains("postbox") {
            return Failure::Runtime(format!(
                "database error: {e}: is the database migrated? run `postbox migrate`"
            ));
        }
        Failure::Runtime(format!("database error: {e}"))
    }
}

impl From<postbox::MigrateError> for Failure {
    fn from(e: postbox::MigrateError) -> Self {
        Failure::Runtime(e.to_string())
    }
}

fn init_logging(format: &str) -> Result<(), ConfigError> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        "text" => builder.init(),
        "json" => builder.json().flatten_event(true).init(),
        other => {
            return Err(ConfigError::new(
                "POSTBOX_LOG_FORMAT",
                format!("must be text or json, got {other:?}"),
            ));
        }
    }
    Ok(())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // A .env file is optional; a malformed one is a configuration error.
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("error: .env: {e}");
            return ExitCode::from(2);
        }
    }
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli.command, cli.db));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command, db: DbArgs) -> Result<(), Failure> {
    match command {
        Command::Migrate => {
            let pool = db.connect(1).await?;
            let applied = postbox::migrate(&pool).await?;
            if applied.is_empty() {
                println!(
                    "migrations: up to date (version {})",
                    postbox::migrate::latest_version()
                );
            } else {
                println!("migrations: applied {applied:?}");
            }
            Ok(())
        }
        Command::Worker(args) => worker::run(*args, &db).await,
        Command::Enqueue(args) => admin::enqueue(args, &db).await,
        Command::Status(args) => admin::status(args, &db).await,
        Command::Replay(args) => admin::replay(args, &db).await,
        Command::Endpoint(args) => endpoint::endpoint(args, &db).await,
        Command::Event(args) => inspect::run(args, &db).await,
        Command::Secret(args) => admin::secret(args),
        Command::Listen(args) => listen::run(args).await,
        Command::Demo(args) => demo::run(args, &db).await,
    }
}

/// Prints `value` as pretty JSON on standard output (the `--json` of every
/// command that reads).
pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("a JSON value always serialises")
    );
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgSslMode;

    fn mode(url: &str, env: bool) -> PgSslMode {
        let opts: PgConnectOptions = url.parse().unwrap();
        without_tls_on_loopback(url, env, opts).get_ssl_mode()
    }

    #[test]
    fn loopback_without_sslmode_is_plain_and_everything_else_is_as_given() {
        for url in [
            "postgres://u@127.0.0.1:5432/db",
            "postgres://u@localhost/db",
            "postgres://u@[::1]:5432/db",
            "postgres://u@127.0.0.2/db",
        ] {
            assert!(matches!(mode(url, false), PgSslMode::Disable), "{url}");
            assert!(matches!(mode(url, true), PgSslMode::Prefer), "{url} with PGSSLMODE set");
        }
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=require", false),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@localhost/db?sslmode=prefer", false),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@db.example.com/db", false),
            PgSslMode::Prefer
        ));
        assert!(matches!(mode("postgres://u@10.0.0.5/db", false), PgSslMode::Prefer));
        assert!(matches!(
            mode("postgres://u@db.example.com/db?sslmode=verify-full", false),
            PgSslMode::VerifyFull
        ));
    }
}
