//! PostgreSQL access for Trellis: the pool, the embedded migrator, the repositories of each
//! domain schema and the transactional outbox.
//!
//! Every function takes an executor or a transaction from its caller, so a command handler
//! can write its domain rows and its outbox rows in one transaction.

pub mod activity;
pub mod circles;
pub mod contacts;
pub mod disputes;
pub mod dlq_audit;
pub mod flags;
pub mod idempotency;
pub mod identity;
pub mod migrate;
pub mod outbox;
pub mod page;
pub mod roles;
pub mod scores;
pub mod search;
pub mod search_model;
pub mod shadow;
pub mod shadow_disputes;
pub mod shadow_scores;
pub mod shadow_search;
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
}

impl PoolConfig {
    pub fn new(application_name: impl Into<String>) -> Self {
        Self {
            max_connections: 16,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            application_name: application_name.into(),
        }
    }
}

/// Opens a pool lazily: no connection is made until one is needed, so a process starts (and
/// reports "not ready") while the database is still down.
pub fn connect_lazy(database_url: &str, config: &PoolConfig) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = database_url.parse()?;
    let options = options
        .application_name(&config.application_name)
        .options([("statement_timeout", format!("{}", config.statement_timeout.as_millis()))]);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(config.min_connections)
        .acquire_timeout(config.acquire_timeout)
        .test_before_acquire(false)
        .connect_lazy_with(options))
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
