//! PostgreSQL access for Trellis: the pool, the embedded migrator, the queries of each domain
//! schema, and the outbox as the relay reads it.
//!
//! Queries, not policy: what a change means (which rows it touches, what it is allowed to do,
//! which events it causes) is a command of `trellis_commands`, which calls these. Every function
//! takes an executor or a transaction from its caller, so a command writes its domain rows and
//! (through `trellis_commands::commit`) its outbox rows in one transaction. Rows decode straight
//! into the domain's enums (status, kind, role, priority).

pub mod activity;
pub mod circles;
pub mod contacts;
pub mod cutover;
pub mod disputes;
pub mod dlq_audit;
pub mod idempotency;
pub mod identity;
pub mod migrate;
pub mod outbox;
pub mod page;
pub mod roles;
pub mod scores;
pub mod search;
pub mod search_model;
pub mod user_admin;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

pub use sqlx;

pub type Tx<'a> = Transaction<'a, Postgres>;

/// How a pool connects and how long anything may take.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_connections: u32,
    pub min_connections: u32,
    /// Longest wait for a free connection; past it the caller gets an error, not a hang.
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for every statement on these connections.
    pub statement_timeout: Duration,
    /// `application_name`, so `pg_stat_activity` tells the pools apart.
    pub application_name: String,
    /// Server-side `idle_in_transaction_session_timeout`: a transaction whose client stops
    /// talking (a stuck process, a network partition) ends after this, and its locks with it.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// Server-side `client_connection_check_interval`: a statement (a lock wait included) of a
    /// client that has gone away is cancelled within this, rather than when it next writes.
    pub client_check_interval: Option<Duration>,
    /// Whether an outbox insert on these connections notifies the relays at its commit
    /// (`trellis.outbox_notify`, read by the outbox's trigger). Off only where the writer wakes
    /// a relay itself: a notifying commit holds a database-wide lock from before its WAL flush
    /// until it ends, so notifying commits happen one at a time.
    pub outbox_notify: bool,
}

impl PoolConfig {
    pub fn new(application_name: impl Into<String>) -> Self {
        Self {
            max_connections: 16,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            application_name: application_name.into(),
            idle_in_transaction_timeout: None,
            client_check_interval: None,
            outbox_notify: true,
        }
    }
}

/// Opens a pool lazily: no connection is made until one is needed, so a process starts (and
/// reports "not ready") while the database is still down.
pub fn connect_lazy(database_url: &str, config: &PoolConfig) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = database_url.parse()?;
    let mut settings = vec![("statement_timeout", format!("{}", config.statement_timeout.as_millis()))];
    if let Some(t) = config.idle_in_transaction_timeout {
        settings.push(("idle_in_transaction_session_timeout", format!("{}", t.as_millis())));
    }
    if let Some(t) = config.client_check_interval {
        settings.push(("client_connection_check_interval", format!("{}", t.as_millis())));
    }
    if !config.outbox_notify {
        settings.push(("trellis.outbox_notify", "off".to_owned()));
    }
    let options = options.application_name(&config.application_name).options(settings);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(config.min_connections)
        .acquire_timeout(config.acquire_timeout)
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// Begins a transaction on a live connection of `pool`.
///
/// The pool does not test a connection before handing it out (a round trip on every acquire
/// would cost the hot reads more than failures ever do), so after the server ended its
/// backends (a restart, `pg_terminate_backend`) the idle connections are dead. A `BEGIN` on one
/// fails and has no effect anywhere, and the failed connection is discarded when it goes back
/// to the pool; so the `BEGIN` is tried again, on the next connection, until one works: at most
/// once more than the pool holds connections.
pub async fn begin(pool: &PgPool) -> Result<Tx<'static>, sqlx::Error> {
    let attempts = pool.options().get_max_connections() + 1;
    let mut attempt = 1;
    loop {
        match pool.begin().await {
            Err(e) if is_connection_lost(&e) && attempt < attempts => {
                tracing::info!(error = %e, attempt, "a pooled connection was dead; beginning on another");
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// Whether `error` means that a connection which was established has gone (its server process
/// ended, or the network dropped it): nothing more can happen on it, and another connection may
/// well work. A statement that failed this way may or may not have run; a transaction whose
/// `COMMIT` had not been sent did not commit.
pub fn is_connection_lost(error: &sqlx::Error) -> bool {
    use std::io::ErrorKind;
    match error {
        sqlx::Error::Io(e) => matches!(
            e.kind(),
            ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::NotConnected
        ),
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // admin_shutdown (pg_terminate_backend), crash_shutdown, idle_session_timeout,
            // idle_in_transaction_session_timeout, connection_exception and its failures
            Some("57P01" | "57P02" | "57P05" | "25P03" | "08000" | "08003" | "08006")
        ),
        _ => false,
    }
}

/// Whether an error means "the database is unavailable or too slow right now" (worth a retry
/// and a 503) rather than a bug or a bad request.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // query_canceled (statement_timeout), lock_not_available, admin/crash shutdown,
            // cannot_connect_now, too_many_connections, serialization/deadlock
            Some("57014" | "55P03" | "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
        ),
        _ => false,
    }
}

/// The name of the violated constraint, if `error` is a unique/foreign-key/check violation.
pub fn violated_constraint(error: &sqlx::Error) -> Option<&str> {
    match error {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}
