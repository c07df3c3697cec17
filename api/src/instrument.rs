//! What trellis-api measures beyond the runtime: every metric named once in [`name`], one
//! struct per emission whose `emit()` logs and counts, and [`register`] exporting the series
//! with bounded labels at zero at start-up. The conventions are the runtime's
//! (`trellis_runtime::instrument`).
#![allow(clippy::disallowed_macros)]

use std::time::Duration;

/// The metric names of trellis-api.
pub mod name {
    pub const HTTP_REQUEST_DURATION_SECONDS: &str = "trellis_http_request_duration_seconds";
    pub const API_REQUESTS_SHED_TOTAL: &str = "trellis_api_requests_shed_total";
    pub const API_CONNECTIONS_DISPLACED_TOTAL: &str = "trellis_api_connections_displaced_total";
    pub const API_LOGIN_RESPONSES_TOTAL: &str = "trellis_api_login_responses_total";
    pub const API_PASSWORD_HASHES_TOTAL: &str = "trellis_api_password_hashes_total";
    pub const API_RATE_LIMITER_KEYS: &str = "trellis_api_rate_limiter_keys";
    pub const API_IDEMPOTENCY_KEYS: &str = "trellis_api_idempotency_keys";
    pub const API_DAILY_ACTIVE_USERS: &str = "trellis_api_daily_active_users";
    pub const SEARCH_FALLBACKS_TOTAL: &str = "trellis_search_fallbacks_total";
    pub const API_DB_READS_TOTAL: &str = "trellis_api_db_reads_total";
    pub const API_DB_REPLICA_FALLBACKS_TOTAL: &str = "trellis_api_db_replica_fallbacks_total";
    pub const API_DB_REPLICA_LAG_BYTES: &str = "trellis_api_db_replica_lag_bytes";
    pub const API_DB_REPLICA_LAG_SECONDS: &str = "trellis_api_db_replica_lag_seconds";
    pub const API_TOKEN_CACHE_LOOKUPS_TOTAL: &str = "trellis_api_token_cache_lookups_total";
}

/// Every name in [`name`].
pub const NAMES: &[&str] = &[
    name::HTTP_REQUEST_DURATION_SECONDS,
    name::API_REQUESTS_SHED_TOTAL,
    name::API_CONNECTIONS_DISPLACED_TOTAL,
    name::API_LOGIN_RESPONSES_TOTAL,
    name::API_PASSWORD_HASHES_TOTAL,
    name::API_RATE_LIMITER_KEYS,
    name::API_IDEMPOTENCY_KEYS,
    name::API_DAILY_ACTIVE_USERS,
    name::SEARCH_FALLBACKS_TOTAL,
    name::API_DB_READS_TOTAL,
    name::API_DB_REPLICA_FALLBACKS_TOTAL,
    name::API_DB_REPLICA_LAG_BYTES,
    name::API_DB_REPLICA_LAG_SECONDS,
    name::API_TOKEN_CACHE_LOOKUPS_TOTAL,
];

/// Why a request or a connection was refused at once (`trellis_api_requests_shed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The process holds its maximum of connections.
    Connections,
    /// The client address holds its maximum of connections.
    ConnectionsPerAddress,
    /// The process is handling its maximum of requests.
    InFlight,
    /// Password hashing is at capacity and its queue is full.
    PasswordHashing,
}

impl ShedReason {
    pub const ALL: [ShedReason; 4] =
        [Self::Connections, Self::ConnectionsPerAddress, Self::InFlight, Self::PasswordHashing];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::ConnectionsPerAddress => "connections_per_address",
            Self::InFlight => "in_flight",
            Self::PasswordHashing => "password_hashing",
        }
    }
}

/// Why a lag-tolerant read went to the primary although read replicas are configured
/// (`trellis_api_db_replica_fallbacks_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaFallbackReason {
    /// A replica is within the lag bound, but none has replayed the request's required position
    /// (its own write, or the `Trellis-Commit-LSN` it sent).
    OwnWrite,
    /// Every replica that answers its poll lags more than `DATABASE_READ_MAX_LAG`.
    Lagging,
    /// No replica answered its last poll (or none is a standby).
    Unreachable,
    /// A replica did not authenticate the bearer token; the primary checked it.
    Unauthenticated,
}

impl ReplicaFallbackReason {
    pub const ALL: [ReplicaFallbackReason; 4] =
        [Self::OwnWrite, Self::Lagging, Self::Unreachable, Self::Unauthenticated];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OwnWrite => "own_write",
            Self::Lagging => "lagging",
            Self::Unreachable => "unreachable",
            Self::Unauthenticated => "unauthenticated",
        }
    }
}

/// What a token cache lookup came to (`trellis_api_token_cache_lookups_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCacheOutcome {
    /// The token was cached: no token lookup in the database.
    Hit,
    /// Not cached (or past its time): the database authenticated it.
    Miss,
    /// The cache is not trusted (its change listener is not connected): the database did.
    Bypassed,
}

impl TokenCacheOutcome {
    pub const ALL: [TokenCacheOutcome; 3] = [Self::Hit, Self::Miss, Self::Bypassed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypassed => "bypassed",
        }
    }
}

/// What a password hash was for (`trellis_api_password_hashes_total{operation}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashOperation {
    Hash,
    Verify,
}

impl HashOperation {
    pub const ALL: [HashOperation; 2] = [Self::Hash, Self::Verify];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hash => "hash",
            Self::Verify => "verify",
        }
    }
}

/// The values of `trellis_api_login_responses_total{status}`: every status `POST /v1/sessions`
/// answers with, and `other`.
pub const LOGIN_STATUSES: [&str; 10] = ["201", "400", "401", "403", "413", "415", "422", "429", "503", "other"];

/// Exports the API's series with bounded labels at zero.
pub fn register() {
    for endpoint in crate::routes::search::ENDPOINTS {
        metrics::counter!(name::SEARCH_FALLBACKS_TOTAL, "endpoint" => endpoint).increment(0);
    }
    for status in LOGIN_STATUSES {
        metrics::counter!(name::API_LOGIN_RESPONSES_TOTAL, "status" => status).increment(0);
    }
    for operation in HashOperation::ALL {
        metrics::counter!(name::API_PASSWORD_HASHES_TOTAL, "operation" => operation.as_str()).increment(0);
    }
    for limiter in crate::ratelimit::LIMITERS {
        metrics::gauge!(name::API_RATE_LIMITER_KEYS, "limiter" => limiter).set(0.0);
    }
    for reason in ShedReason::ALL {
        metrics::counter!(name::API_REQUESTS_SHED_TOTAL, "reason" => reason.as_str()).increment(0);
    }
    metrics::counter!(name::API_CONNECTIONS_DISPLACED_TOTAL).increment(0);
    // With or without read replicas, so that the alert on them always has its series.
    for reason in ReplicaFallbackReason::ALL {
        metrics::counter!(name::API_DB_REPLICA_FALLBACKS_TOTAL, "reason" => reason.as_str()).increment(0);
    }
}

/// Exports the token cache's lookups at zero. Called only when `TOKEN_CACHE_TTL` is not 0.
pub fn register_token_cache() {
    for outcome in TokenCacheOutcome::ALL {
        metrics::counter!(name::API_TOKEN_CACHE_LOOKUPS_TOTAL, "outcome" => outcome.as_str()).increment(0);
    }
}

/// A bearer token was looked up in the token cache.
pub struct TokenCacheLookup {
    pub outcome: TokenCacheOutcome,
}

impl TokenCacheLookup {
    pub fn emit(self) {
        tracing::trace!(outcome = self.outcome.as_str(), "token cache lookup");
        metrics::counter!(name::API_TOKEN_CACHE_LOOKUPS_TOTAL, "outcome" => self.outcome.as_str()).increment(1);
    }
}

/// Exports the read replicas' series at zero: reads per target (`primary` and each replica) and
/// each replica's lag. Called only when `DATABASE_READ_URL` names replicas.
pub fn register_read_replicas(replicas: &[&'static str]) {
    metrics::counter!(name::API_DB_READS_TOTAL, "target" => crate::read_replicas::PRIMARY).increment(0);
    for &replica in replicas {
        metrics::counter!(name::API_DB_READS_TOTAL, "target" => replica).increment(0);
        metrics::gauge!(name::API_DB_REPLICA_LAG_BYTES, "replica" => replica).set(0.0);
        metrics::gauge!(name::API_DB_REPLICA_LAG_SECONDS, "replica" => replica).set(0.0);
    }
}

/// A lag-tolerant read was given its database (`primary`, or a replica's name).
pub struct ReadServed {
    pub target: &'static str,
}

impl ReadServed {
    pub fn emit(self) {
        tracing::trace!(target_db = self.target, "lag-tolerant read");
        metrics::counter!(name::API_DB_READS_TOTAL, "target" => self.target).increment(1);
    }
}

/// A lag-tolerant read went to the primary although read replicas are configured.
pub struct ReadFellBack {
    pub reason: ReplicaFallbackReason,
}

impl ReadFellBack {
    pub fn emit(self) {
        tracing::debug!(reason = self.reason.as_str(), "read on the primary instead of a replica");
        metrics::counter!(name::API_DB_REPLICA_FALLBACKS_TOTAL, "reason" => self.reason.as_str()).increment(1);
    }
}

/// A read replica's lag, as one poll measured it.
pub struct ReplicaPolled {
    pub replica: &'static str,
    pub lag: Duration,
    pub lag_bytes: u64,
}

impl ReplicaPolled {
    pub fn emit(self) {
        tracing::trace!(
            replica = self.replica,
            lag_seconds = self.lag.as_secs_f64(),
            lag_bytes = self.lag_bytes,
            "read replica polled"
        );
        metrics::gauge!(name::API_DB_REPLICA_LAG_BYTES, "replica" => self.replica).set(self.lag_bytes as f64);
        metrics::gauge!(name::API_DB_REPLICA_LAG_SECONDS, "replica" => self.replica).set(self.lag.as_secs_f64());
    }
}

/// A request or a connection was refused at once.
pub struct RequestShed {
    pub reason: ShedReason,
}

impl RequestShed {
    pub fn emit(self) {
        tracing::debug!(reason = self.reason.as_str(), "load shed");
        metrics::counter!(name::API_REQUESTS_SHED_TOTAL, "reason" => self.reason.as_str()).increment(1);
    }
}

/// At the connection cap, a new connection took the place of one that had not been served.
pub struct ConnectionDisplaced;

impl ConnectionDisplaced {
    pub fn emit(self) {
        tracing::debug!("connection displaced");
        metrics::counter!(name::API_CONNECTIONS_DISPLACED_TOTAL).increment(1);
    }
}

/// A request was answered (`route` is the matched template, or `unmatched`); a 5xx logs its cause.
pub struct RequestAnswered<'a> {
    pub route: String,
    pub method: String,
    pub status: axum::http::StatusCode,
    pub duration: Duration,
    pub cause: Option<&'a dyn std::fmt::Display>,
}

impl RequestAnswered<'_> {
    pub fn emit(self) {
        let Self { route, method, status, duration, cause } = self;
        if let Some(cause) = cause {
            tracing::error!(%route, %method, status = status.as_u16(), cause = %cause, "request failed");
        } else {
            tracing::debug!(%route, %method, status = status.as_u16(), ?duration, "request answered");
        }
        if route == "/v1/sessions" && method == "POST" {
            let code = status.as_str();
            let label = LOGIN_STATUSES.iter().copied().find(|s| *s == code).unwrap_or("other");
            metrics::counter!(name::API_LOGIN_RESPONSES_TOTAL, "status" => label).increment(1);
        }
        let class = match status.as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        metrics::histogram!(
            name::HTTP_REQUEST_DURATION_SECONDS,
            "route" => route, "method" => method, "status_class" => class
        )
        .record(duration.as_secs_f64());
    }
}

/// A password hash or verification was handed to a hashing thread.
pub struct PasswordHashStarted {
    pub operation: HashOperation,
}

impl PasswordHashStarted {
    pub fn emit(self) {
        tracing::trace!(operation = self.operation.as_str(), "password hash");
        metrics::counter!(name::API_PASSWORD_HASHES_TOTAL, "operation" => self.operation.as_str()).increment(1);
    }
}

/// A rate limiter's number of keys after it changed.
pub struct RateLimiterResized {
    pub limiter: &'static str,
    pub keys: usize,
}

impl RateLimiterResized {
    pub fn emit(self) {
        tracing::trace!(limiter = self.limiter, keys = self.keys, "rate limiter keys");
        metrics::gauge!(name::API_RATE_LIMITER_KEYS, "limiter" => self.limiter).set(self.keys as f64);
    }
}

/// The idempotency table's live rows, as last counted.
pub struct IdempotencyKeysCounted {
    pub keys: i64,
}

impl IdempotencyKeysCounted {
    pub fn emit(self) {
        tracing::debug!(keys = self.keys, "idempotency keys counted");
        metrics::gauge!(name::API_IDEMPOTENCY_KEYS).set(self.keys as f64);
    }
}

/// The users active today, as last counted.
pub struct DailyActiveUsersCounted {
    pub users: i64,
}

impl DailyActiveUsersCounted {
    pub fn emit(self) {
        tracing::debug!(users = self.users, "daily active users counted");
        metrics::gauge!(name::API_DAILY_ACTIVE_USERS).set(self.users as f64);
    }
}

/// A search was answered from the database because the index is too far behind.
pub struct SearchFellBack {
    pub endpoint: &'static str,
}

impl SearchFellBack {
    pub fn emit(self) {
        tracing::debug!(endpoint = self.endpoint, "search answered from the database");
        metrics::counter!(name::SEARCH_FALLBACKS_TOTAL, "endpoint" => self.endpoint).increment(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_name_of_the_api_follows_the_scheme() {
        for name in super::NAMES {
            trellis_runtime::instrument::check_name(name).unwrap();
        }
    }
}
