//! `trellis-api` configuration.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_runtime::config::CommonArgs;

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

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,

    /// Backstop for a whole request; statements and NATS calls have their own, shorter limit.
    #[arg(long, env = "REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub request_timeout: Duration,

    /// Lifetime of a bearer token.
    #[arg(long, env = "TOKEN_TTL", value_parser = humantime::parse_duration, default_value = "30days")]
    pub token_ttl: Duration,

    /// Lifetime of an `Idempotency-Key`.
    #[arg(long, env = "IDEMPOTENCY_TTL", value_parser = humantime::parse_duration, default_value = "24h")]
    pub idempotency_ttl: Duration,

    /// Login attempts allowed per login name per minute.
    #[arg(long, env = "LOGIN_RATE_PER_LOGIN", default_value_t = 10)]
    pub login_rate_per_login: u32,

    /// Login attempts allowed per client address per minute.
    #[arg(long, env = "LOGIN_RATE_PER_ADDRESS", default_value_t = 60)]
    pub login_rate_per_address: u32,

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

    /// The score orchestrator's settings, for when `score.executor` says `monolith`.
    #[command(flatten)]
    pub score: score_orchestrator::ScoreArgs,

    /// The dispute processor's settings, for when `dispute.executor` says `monolith`.
    #[command(flatten)]
    pub dispute: dispute_processor::ProcessorArgs,

    #[command(flatten)]
    pub promotion: trellis_runtime::config::PromotionArgs,

    /// The search projector's shadow candidate, for when `search.executor` says `shadow` with the
    /// worker as the primary.
    #[command(flatten)]
    pub search_shadow: search_projector::shadow::ShadowArgs,
}

fn default_pool_size() -> u32 {
    std::thread::available_parallelism().map_or(8, |n| 4 * n.get() as u32)
}
