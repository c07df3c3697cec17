//! Configuration shared by every long-running binary: flags with environment fallbacks.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_domain::shadow::PromotionPolicy;

/// A secret string whose `Debug` output is redacted.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Flags every long-running Trellis process takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/trellis")]
    pub database_url: Secret,

    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// Prefix for every stream, subject and consumer name, so that tenants (tests, staging)
    /// can share one NATS server in isolation. Letters, digits, `-` and `_`; empty by default.
    #[arg(long, env = "NATS_PREFIX", default_value = "")]
    pub nats_prefix: String,

    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:9080")]
    pub admin_addr: SocketAddr,

    /// Log output format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// Timeout of every database statement and NATS request.
    #[arg(long, env = "IO_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub io_timeout: Duration,

    /// Timeout of batch work (relay batches, score runs, rebuilds).
    #[arg(long, env = "BATCH_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub batch_timeout: Duration,

    /// How long SIGTERM waits for in-flight work before giving up on it.
    #[arg(long, env = "SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "20s")]
    pub shutdown_grace: Duration,
}

/// The promotion gate of the cutover flags: a change that makes the worker a processor's
/// executor needs a shadow period with enough comparisons and few enough mismatches
/// (`trellisctl flags set`, and the admin API of `trellis-api`).
#[derive(Debug, Clone, clap::Args)]
pub struct PromotionArgs {
    /// Comparisons (matched + mismatched) the shadow period must have made.
    #[arg(long = "promotion-min-comparisons", env = "TRELLIS_PROMOTION_MIN_COMPARISONS",
          default_value_t = PromotionPolicy::DEFAULT_MIN_COMPARISONS)]
    pub min_comparisons: i64,
    /// Highest mismatch rate allowed, as a fraction (0.001 = 0.1 %).
    #[arg(long = "promotion-max-mismatch-rate", env = "TRELLIS_PROMOTION_MAX_MISMATCH_RATE",
          default_value_t = PromotionPolicy::DEFAULT_MAX_MISMATCH_RATE)]
    pub max_mismatch_rate: f64,
}

impl PromotionArgs {
    pub fn policy(&self) -> Result<PromotionPolicy, String> {
        if self.min_comparisons < 0 {
            return Err(format!("--promotion-min-comparisons must be at least 0, not {}", self.min_comparisons));
        }
        if !(0.0..=1.0).contains(&self.max_mismatch_rate) {
            return Err(format!(
                "--promotion-max-mismatch-rate is a fraction between 0 and 1, not {}",
                self.max_mismatch_rate
            ));
        }
        Ok(PromotionPolicy { min_comparisons: self.min_comparisons, max_mismatch_rate: self.max_mismatch_rate })
    }
}
