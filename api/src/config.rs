//! `trellis-api` configuration.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_runtime::config::{CommonArgs, Secret, SecretUrl};

use crate::client_address::TrustedProxies;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "trellis-api", version, about = "The Trellis HTTP API monolith and its outbox relay")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Address of the public HTTP API.
    #[arg(long, env = "API_ADDR", default_value = "127.0.0.1:8080")]
    pub api_addr: SocketAddr,

    /// Connections in the request pool. The default is 4 per CPU core: on the 2-core benchmark
    /// machine 32 connections served a fifth fewer reads and no more writes (docs/BENCHMARKS.md);
    /// more connections than PostgreSQL can run at once only add context switches.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = default_pool_size())]
    pub db_pool_size: u32,

    /// Read replicas of the database: comma-separated `postgres://` URLs of PostgreSQL streaming
    /// replicas (standbys) of `DATABASE_URL`. The lag-tolerant reads (search, profiles, scores,
    /// contact and circle lists) go to one that is within `DATABASE_READ_MAX_LAG` and has
    /// replayed the caller's last write, the primary otherwise. Empty (the default): every read
    /// goes to the primary and nothing about replicas runs. URLs may carry passwords: logs and
    /// errors show them redacted.
    #[arg(long, env = "DATABASE_READ_URL", hide_env_values = true, default_value = "")]
    pub database_read_url: SecretUrl,

    /// How often each read replica's replayed position and lag are read.
    #[arg(long, env = "DATABASE_READ_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub database_read_poll_interval: Duration,

    /// A read replica lagging more than this behind the primary (or whose lag is not known for
    /// that long) serves no reads until it catches up. It also bounds how long a revoked bearer
    /// token can still authenticate a read on a replica. Must exceed
    /// `DATABASE_READ_POLL_INTERVAL`.
    #[arg(long, env = "DATABASE_READ_MAX_LAG", value_parser = humantime::parse_duration, default_value = "2s")]
    pub database_read_max_lag: Duration,

    /// Bearer tokens whose last write position this process remembers for read-your-writes, at
    /// most. Beyond it, reads go to the primary until the replicas catch up.
    #[arg(long, env = "DATABASE_READ_SESSIONS", default_value_t = 100_000)]
    pub database_read_sessions: usize,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,

    /// Longest a request may take. A write's handler gets this less `IO_TIMEOUT` and its commit
    /// `IO_TIMEOUT`, so a write's transaction (and its idempotency key) never outlives it;
    /// statements and NATS calls have their own, shorter limit.
    #[arg(long, env = "REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub request_timeout: Duration,

    /// Lifetime of a bearer token.
    #[arg(long, env = "TOKEN_TTL", value_parser = humantime::parse_duration, default_value = "30days")]
    pub token_ttl: Duration,

    /// Where the on-call console is served: `public` (`/console` on the API listener), `admin`
    /// (`/console` on the admin listener only, for deployments that keep operations off the
    /// public network) or `off`.
    #[arg(long, env = "CONSOLE", value_enum, default_value = "public")]
    pub console: crate::console::ConsoleListener,

    /// A console session ends this long after its sign-in, however active.
    #[arg(long, env = "CONSOLE_SESSION_TTL", value_parser = humantime::parse_duration, default_value = "8h")]
    pub console_session_ttl: Duration,

    /// A console session unused for this long ends (written down with the activity flush, like
    /// `TOKEN_IDLE_TIMEOUT`, so it must exceed twice `ACTIVITY_FLUSH_INTERVAL` plus a minute).
    #[arg(long, env = "CONSOLE_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30m")]
    pub console_idle_timeout: Duration,

    /// The console's source of the stage triggers and of the processors' throughput charts: a
    /// Prometheus (its HTTP API) that loads `deploy/prometheus/trellis.rules.yml`. Without it
    /// the console reads the processes' `/metrics` (`TRELLIS_METRICS_URLS`) and the database.
    #[arg(long, env = "PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,

    /// Without `PROMETHEUS_URL`: the `/metrics` URLs of the processes (comma-separated) the
    /// console samples. The default is `cargo xtask up`'s.
    #[arg(long = "metrics-url", env = "TRELLIS_METRICS_URLS", value_delimiter = ',',
        default_values = trellis_ops::triggers::DEFAULT_METRICS_URLS)]
    pub metrics_urls: Vec<String>,

    /// Without `PROMETHEUS_URL`: how often the console samples those `/metrics` for its charts.
    #[arg(long, env = "CONSOLE_SAMPLE_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub console_sample_interval: Duration,

    /// Lifetime of an `Idempotency-Key`.
    #[arg(long, env = "IDEMPOTENCY_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub idempotency_ttl: Duration,

    /// A bearer token unused for this long stops authenticating, within its `TOKEN_TTL`. Uses are
    /// written down with the activity flush, at most once a minute per token, so it must exceed
    /// twice `ACTIVITY_FLUSH_INTERVAL` plus a minute.
    #[arg(long, env = "TOKEN_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "14days")]
    pub token_idle_timeout: Duration,

    /// How long a bearer token's principal is kept in this process's token cache after the
    /// primary authenticated it, at most (never past the token's expiry or idle timeout). A
    /// revocation, suspension, role or password change reaches every API process through a
    /// PostgreSQL notification within milliseconds; this bounds how long it may go unnoticed when
    /// the notification is lost. `0` turns the cache off: every request looks its token up.
    #[arg(long, env = "TOKEN_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub token_cache_ttl: Duration,

    /// Bearer tokens the token cache holds at most (about 100 bytes each). When full, entries
    /// past their time go first, everything if that is not half.
    #[arg(long, env = "TOKEN_CACHE_ENTRIES", default_value_t = 100_000)]
    pub token_cache_entries: usize,

    /// Live bearer tokens one user may hold; a sign-in beyond it revokes their oldest.
    #[arg(long, env = "TOKENS_PER_USER", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub tokens_per_user: u32,

    /// How often expired idempotency keys and dead tokens (revoked, expired, idle) are deleted,
    /// each time until none is left, and the `trellis_api_idempotency_keys` gauge is refreshed.
    #[arg(long, env = "PRUNE_INTERVAL", value_parser = humantime::parse_duration, default_value = "5m")]
    pub prune_interval: Duration,

    /// Distinct tokens remembered between two activity flushes: the tracker's memory bound.
    #[arg(long, env = "ACTIVITY_MAX_TOKENS", default_value_t = 100_000)]
    pub activity_max_tokens: usize,

    /// Login attempts allowed per account per minute: per user once the login names one (its
    /// handle and its e-mail address share one allowance), per login name otherwise. Answered
    /// with 429 and `Retry-After`.
    #[arg(long, env = "LOGIN_RATE_PER_ACCOUNT", default_value_t = 10)]
    pub login_rate_per_account: u32,

    /// Login attempts allowed per client address (an IPv6 /64 counts as one) per minute,
    /// checked before anything else of a login. Answered with 429 and `Retry-After`.
    #[arg(long, env = "LOGIN_RATE_PER_ADDRESS", default_value_t = 60)]
    pub login_rate_per_address: u32,

    /// Registrations allowed per client address (an IPv6 /64 counts as one) per hour. Answered
    /// with 429 and `Retry-After`.
    #[arg(long, env = "REGISTRATION_RATE_PER_ADDRESS", default_value_t = 20)]
    pub registration_rate_per_address: u32,

    /// Registrations allowed per minute from all addresses together, per replica. Answered
    /// with 429 and `Retry-After`.
    #[arg(long, env = "REGISTRATION_RATE_GLOBAL", default_value_t = 300)]
    pub registration_rate_global: u32,

    /// Checks of the current password (`PATCH /v1/me` changing the e-mail or password)
    /// allowed per user per hour. Answered with 429 and `Retry-After`.
    #[arg(long, env = "CURRENT_PASSWORD_RATE_PER_USER", default_value_t = 10)]
    pub current_password_rate_per_user: u32,

    /// Keys each keyed rate limiter keeps at most (accounts, addresses, users). When full, the
    /// key closest to a fresh allowance is forgotten first, so a flood of new keys cannot push
    /// out the state of a key that is being limited.
    #[arg(long, env = "RATE_LIMITER_CAPACITY", default_value_t = 100_000)]
    pub rate_limiter_capacity: usize,

    /// How often the rate limiters forget keys whose allowance has fully recovered.
    #[arg(long, env = "RATE_LIMITER_PRUNE_INTERVAL", value_parser = humantime::parse_duration, default_value = "60s")]
    pub rate_limiter_prune_interval: Duration,

    /// Proxies whose forwarded-for headers are believed, as a comma-separated list of CIDRs
    /// (`10.0.0.0/8,fd00::/8`). A request whose TCP peer is in the list is attributed to the
    /// nearest untrusted address of `Forwarded` (or, without it, `X-Forwarded-For`); any other
    /// request to its TCP peer. Empty (the default): forwarded headers are ignored.
    /// A bare address is a single-address network.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: TrustedProxies,

    /// Password hashes and verifications (argon2id, 19 MiB each) run at once. The default is
    /// one per CPU core.
    #[arg(long, env = "PASSWORD_HASH_CONCURRENCY", default_value_t = default_hash_concurrency())]
    pub password_hash_concurrency: usize,

    /// Requests that may wait for a password-hashing slot; beyond that, a request that needs
    /// one is answered 503 with `Retry-After` at once. The default is 4 per CPU core.
    #[arg(long, env = "PASSWORD_HASH_QUEUE", default_value_t = 4 * default_hash_concurrency())]
    pub password_hash_queue: usize,

    /// The key that seals list cursors (HMAC-SHA256), at least 32 bytes; every replica of a
    /// deployment needs the same one. Set it in production. Unset, it is derived from
    /// `DATABASE_URL` (replicas that share a database agree), which is as secret as that URL's
    /// password; without a password in the URL a warning is logged, as anyone who knows the URL
    /// can then forge cursors (they stay within the search offset cap).
    #[arg(long, env = "CURSOR_KEY")]
    pub cursor_key: Option<Secret>,

    /// A connection that has not sent a complete request head within this time is closed; the
    /// same bound applies to an idle keep-alive connection.
    #[arg(long, env = "HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,

    /// Open client connections at most. At the cap a new connection displaces one waiting for a
    /// request head; when every open one is in a request, it is answered 503 with `Retry-After`
    /// and closed. Each open connection is a file descriptor: the API raises its soft limit of
    /// open files to the hard limit at start-up and warns when the cap does not fit in it.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Open connections per client address (an IPv6 /64 counts as one) at most; one beyond it is
    /// answered 503 with `Retry-After` and closed. Connections from `TRUSTED_PROXIES` are
    /// counted in `MAX_CONNECTIONS` only.
    #[arg(long, env = "MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 128)]
    pub max_connections_per_address: usize,

    /// Requests handled at once; one beyond it is answered 503 with `Retry-After` at once
    /// rather than queued.
    #[arg(long, env = "MAX_IN_FLIGHT_REQUESTS", default_value_t = 512)]
    pub max_in_flight_requests: usize,

    /// How long a refused request (400, 401, 413, 422, 429 or 503) waits before its answer is
    /// sent, holding nothing but its connection: a client that floods refused requests is
    /// slowed to one per connection per this delay, instead of taking the CPU from everyone
    /// else by being refused as fast as it can send. 0 answers at once.
    #[arg(long, env = "REFUSAL_DELAY", value_parser = humantime::parse_duration, default_value = "250ms")]
    pub refusal_delay: std::time::Duration,

    /// Open (pending or needs-review) disputes one reporter may have, of any priority. Filing
    /// another is answered 429.
    #[arg(long, env = "DISPUTE_OPEN_LIMIT", default_value_t = 20)]
    pub dispute_open_limit: i64,

    /// Open P0 (impersonation) disputes one reporter may have. Filing another is answered 429.
    #[arg(long, env = "DISPUTE_OPEN_LIMIT_P0", default_value_t = 3)]
    pub dispute_open_limit_p0: i64,

    /// How old an account must be to file a P0 (impersonation) dispute: a P0 dispute jumps
    /// every queue and can suspend its target. Younger accounts are answered 422.
    #[arg(long, env = "DISPUTE_P0_MIN_ACCOUNT_AGE", value_parser = humantime::parse_duration, default_value = "24h")]
    pub dispute_p0_min_account_age: Duration,

    /// A score older than this is served with `stale: true`.
    #[arg(long, env = "SCORE_STALE_AFTER", value_parser = humantime::parse_duration, default_value = "24h")]
    pub score_stale_after: Duration,

    /// Search answers from the base tables (and says so) while the search projection is more
    /// than this behind the newest event.
    #[arg(long, env = "SEARCH_MAX_LAG", value_parser = humantime::parse_duration, default_value = "60s")]
    pub search_max_lag: Duration,

    /// Events the outbox relay publishes per batch.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 2000)]
    pub relay_batch_size: i64,

    /// How often the relay looks for events nobody woke it for (another process's writes when
    /// their commit notification was missed). This process's own writes wake it at once.
    #[arg(long, env = "RELAY_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub relay_poll_interval: Duration,

    /// The least time between the starts of two relay batches: while commits come faster than
    /// one an interval, each batch takes what they wrote meanwhile instead of a round trip
    /// (claim, publish, mark, commit) per commit. Delays a publish by at most this; `0s` relays
    /// every wake at once.
    #[arg(long, env = "RELAY_MIN_BATCH_INTERVAL", value_parser = humantime::parse_duration, default_value = "10ms")]
    pub relay_min_batch_interval: Duration,

    /// How often the relay reads the streams' fill levels (`trellis_stream_*` metrics).
    #[arg(long, env = "STREAM_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "15s")]
    pub stream_poll_interval: Duration,

    /// How long published outbox events are kept (for republishing) before pruning.
    #[arg(long, env = "OUTBOX_RETENTION", value_parser = humantime::parse_duration, default_value = "72h")]
    pub outbox_retention: Duration,

    /// How often the users seen by the API are written down and the daily-active-users gauge
    /// refreshed.
    #[arg(long, env = "ACTIVITY_FLUSH_INTERVAL", value_parser = humantime::parse_duration, default_value = "60s")]
    pub activity_flush_interval: Duration,

    /// Run without the outbox relay (another replica relays).
    #[arg(long, env = "NO_RELAY")]
    pub no_relay: bool,

    /// How often the cutover flags are read when no change notification arrives.
    #[arg(long, env = "FLAG_POLL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub flag_poll: Duration,

    /// The score orchestrator's settings, for when `score.executor` says `monolith` (or `shadow`).
    #[command(flatten)]
    pub score: score_orchestrator::ScoreArgs,

    /// The dispute processor's settings, for when `dispute.executor` says `monolith` (or `shadow`).
    #[command(flatten)]
    pub dispute: dispute_processor::ProcessorArgs,

    #[command(flatten)]
    pub promotion: trellis_runtime::config::PromotionArgs,

    /// The search projector's settings, for when `search.executor` says `monolith` (and its shadow
    /// candidate, for when it says `shadow` with the worker as the primary).
    #[command(flatten)]
    pub search: search_projector::SearchArgs,
}

/// The longest `TOKEN_CACHE_TTL` accepted.
pub const MAX_TOKEN_CACHE_TTL: Duration = Duration::from_secs(300);

fn default_hash_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn default_pool_size() -> u32 {
    std::thread::available_parallelism().map_or(8, |n| 4 * n.get() as u32)
}

impl Config {
    /// When bearer tokens stop authenticating, besides `TOKEN_TTL`.
    pub fn token_limits(&self) -> trellis_store::identity::TokenLimits {
        trellis_store::identity::TokenLimits { idle_timeout: self.token_idle_timeout, per_user: self.tokens_per_user }
    }

    /// The read replicas' settings; `None` without `DATABASE_READ_URL`. An error names what is
    /// wrong (URLs redacted).
    pub fn read_replicas(&self) -> Result<Option<crate::read_replicas::Settings>, String> {
        let replicas = crate::read_replicas::parse_urls(self.database_read_url.expose())?;
        if replicas.is_empty() {
            return Ok(None);
        }
        let settings = crate::read_replicas::Settings {
            replicas,
            poll_interval: self.database_read_poll_interval,
            max_lag: self.database_read_max_lag,
            sessions: self.database_read_sessions,
        };
        settings.check()?;
        Ok(Some(settings))
    }

    /// Settings that are each valid but do not fit together.
    pub fn check(&self) -> Result<(), String> {
        self.read_replicas()?;
        if self.request_timeout <= self.common.io_timeout {
            return Err(format!(
                "REQUEST_TIMEOUT ({}) must exceed IO_TIMEOUT ({}): a write's commit gets IO_TIMEOUT of it",
                humantime::format_duration(self.request_timeout),
                humantime::format_duration(self.common.io_timeout)
            ));
        }
        let written_within = 2 * self.activity_flush_interval + Duration::from_secs(60);
        if self.console != crate::console::ConsoleListener::Off && self.console_idle_timeout <= written_within {
            return Err(format!(
                "CONSOLE_IDLE_TIMEOUT ({}) must exceed twice ACTIVITY_FLUSH_INTERVAL plus a minute ({}): a console session \
                 in use could otherwise time out between two writes of its last use (or set CONSOLE=off)",
                humantime::format_duration(self.console_idle_timeout),
                humantime::format_duration(written_within)
            ));
        }
        if !self.token_cache_ttl.is_zero() {
            if self.token_cache_entries == 0 {
                return Err(
                    "TOKEN_CACHE_ENTRIES must be more than 0 (or set TOKEN_CACHE_TTL=0 to turn the cache off)".into()
                );
            }
            if self.token_cache_ttl > MAX_TOKEN_CACHE_TTL {
                return Err(format!(
                    "TOKEN_CACHE_TTL ({}) must be at most {}: it is how long a revoked token may still authenticate \
                     when a notification is lost",
                    humantime::format_duration(self.token_cache_ttl),
                    humantime::format_duration(MAX_TOKEN_CACHE_TTL)
                ));
            }
        }
        if self.token_idle_timeout <= written_within {
            return Err(format!(
                "TOKEN_IDLE_TIMEOUT ({}) must exceed twice ACTIVITY_FLUSH_INTERVAL plus a minute ({}): a token in use \
                 could otherwise time out between two writes of its last use",
                humantime::format_duration(self.token_idle_timeout),
                humantime::format_duration(written_within)
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Config;

    fn config(extra: &[&str]) -> Config {
        let base = ["trellis-api", "--database-url", "postgres://localhost/x"];
        Config::try_parse_from(base.iter().chain(extra)).expect("flags parse")
    }

    #[test]
    fn a_console_idle_timeout_shorter_than_the_activity_writes_is_refused_unless_the_console_is_off() {
        assert_eq!(config(&[]).check(), Ok(()));
        let slow = ["--activity-flush-interval", "1h"];
        let refused = config(&slow).check().unwrap_err();
        assert!(refused.contains("CONSOLE_IDLE_TIMEOUT (30m)"), "{refused}");
        let off = config(&[&slow[..], &["--console", "off"]].concat()).check();
        assert_eq!(off, Ok(()));
        let longer = config(&[&slow[..], &["--console-idle-timeout", "3h"]].concat()).check();
        assert_eq!(longer, Ok(()));
    }

    #[test]
    fn the_token_cache_needs_room_and_a_short_ttl_unless_it_is_off() {
        let parsed = config(&[]);
        assert_eq!((parsed.token_cache_ttl.as_secs(), parsed.token_cache_entries), (5, 100_000));
        let refused = config(&["--token-cache-entries", "0"]).check().unwrap_err();
        assert!(refused.contains("TOKEN_CACHE_ENTRIES"), "{refused}");
        assert_eq!(config(&["--token-cache-entries", "0", "--token-cache-ttl", "0s"]).check(), Ok(()));
        let refused = config(&["--token-cache-ttl", "1h"]).check().unwrap_err();
        assert!(refused.contains("TOKEN_CACHE_TTL (1h)"), "{refused}");
        assert_eq!(config(&["--token-cache-ttl", "60s"]).check(), Ok(()));
    }
}
