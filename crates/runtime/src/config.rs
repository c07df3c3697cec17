//! Configuration shared by every long-running binary: flags with environment fallbacks.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_domain::shadow::PromotionPolicy;

/// A secret: a password, a token, credentials. `Debug` and `Display` print `<redacted>`, and so
/// does anything that formats a value holding one (a config struct's `Debug`, an error's
/// message); [`Secret::expose`] is the one way to the value, for the code that hands it on.
///
/// It parses from a flag or an environment variable without failing (a parser's error would
/// quote the value) and deserialises from a JSON string (a password in a request body).
#[derive(Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_exposed(self) -> String {
        self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
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

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// A connection URL that may carry credentials: `postgres://user:password@host/db`,
/// `?password=…`, `nats://user:password@host`, `nats://token@host`, or a comma-separated list
/// of such URLs (NATS's server list). `Debug` and `Display` print it with every credential
/// replaced by `***` (see [`redact_url`]), so it can be named in a log line or an error
/// message; [`SecretUrl::expose`] is the one way to the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Secret);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(Secret::new(url))
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL as it may be shown: credentials replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(self.0.expose())
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretUrl({:?})", self.redacted())
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

/// Query parameters whose value is a credential (matched as parts of the lower-cased name):
/// libpq's `password` and `sslpassword`, NATS's tokens, keys, JWTs and credentials.
const SECRET_QUERY_PARTS: &[&str] = &["pass", "token", "secret", "key", "jwt", "cred"];

/// `url` with its credentials replaced by `***`: the password of `user:password@`, the whole
/// user part where it is not a PostgreSQL user name (NATS reads `nats://token@host` as a token),
/// and the value of every query parameter that names a credential. A comma-separated list is
/// redacted URL by URL; text that is not a URL is a secret as a whole.
pub fn redact_url(url: &str) -> String {
    url.split(',').map(|one| redact_one_url(one.trim())).collect::<Vec<_>>().join(",")
}

fn redact_one_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<redacted>".to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let authority_end = before_query.find('/').unwrap_or(before_query.len());
    let (authority, path) = before_query.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user_is_a_name = matches!(scheme.to_ascii_lowercase().as_str(), "postgres" | "postgresql");
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***@{host}"),
                None if user_is_a_name => format!("{userinfo}@{host}"),
                None => format!("***@{host}"),
            }
        }
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if SECRET_QUERY_PARTS.iter().any(|p| key.to_ascii_lowercase().contains(p)) => {
                    format!("{key}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Flags every long-running Trellis process takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// PostgreSQL connection URL. It may carry a password: `--help` does not show the
    /// environment's value, and logs and errors show it redacted.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/trellis"
    )]
    pub database_url: SecretUrl,

    /// How to reach and log in to NATS: `NATS_URL`, credentials, TLS.
    #[command(flatten)]
    pub nats: crate::nats_options::NatsOptions,

    /// Prefix for every stream, subject and consumer name, so that tenants (tests, staging)
    /// can share one NATS server in isolation. Letters, digits, `-` and `_`; empty by default.
    #[arg(long, env = "NATS_PREFIX", default_value = "")]
    pub nats_prefix: String,

    /// Stream replicas and byte limits.
    #[command(flatten)]
    pub streams: crate::nats::StreamArgs,

    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`). Port 0 lets the
    /// system pick a free port; `--addr-file` tells which.
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:9080")]
    pub admin_addr: SocketAddr,

    /// A file to write the addresses this process listens on to, once every listener is bound:
    /// a JSON object of listener name to address (`{"admin": "127.0.0.1:40123"}`, and `"api"`
    /// for trellis-api). Whoever started the process with port 0 reads it instead of guessing
    /// a free port. Written to a temporary file and renamed, so it is never seen half-written.
    #[arg(long, env = "ADDR_FILE")]
    pub addr_file: Option<std::path::PathBuf>,

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

    /// How a consumer's process span relates to the trace context a message carries: `child`
    /// (one trace from the HTTP request to the worker's effect, and a link) or `link` (a new
    /// trace per message, linked to the request's).
    #[arg(long, env = "TRACE_CONSUMER_PARENT", value_enum, default_value = "child")]
    pub trace_consumer_parent: crate::trace::ParentMode,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_prints_redacted_in_debug_and_display() {
        let secret = Secret::new("hunter2-hunter2");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{secret}"), "<redacted>");
        assert_eq!(secret.expose(), "hunter2-hunter2");
        let parsed: Secret = serde_json::from_str("\"hunter2-hunter2\"").unwrap();
        assert_eq!(parsed, secret);
    }

    #[test]
    fn a_secret_url_prints_its_host_but_not_its_credentials() {
        let url = SecretUrl::new("postgres://trellis_api:s3cret-pw@db:5432/trellis?sslmode=require&password=other-pw");
        for shown in [format!("{url}"), format!("{url:?}"), format!("{:?}", Some(url.clone()))] {
            assert!(!shown.contains("s3cret-pw") && !shown.contains("other-pw"), "{shown}");
            assert!(shown.contains("trellis_api:***@db:5432/trellis"), "{shown}");
            assert!(shown.contains("sslmode=require"), "{shown}");
        }
        assert!(url.expose().contains("s3cret-pw"));
    }

    #[test]
    fn redact_url_hides_every_kind_of_credential() {
        assert_eq!(redact_url("postgres://postgres@127.0.0.1/trellis"), "postgres://postgres@127.0.0.1/trellis");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("nats://a-token@nats:4222"), "nats://***@nats:4222");
        assert_eq!(redact_url("nats://u:p@a:4222, tls://v:q@b:4222"), "nats://u:***@a:4222,tls://v:***@b:4222");
        assert_eq!(
            redact_url("postgres://db/trellis?sslpassword=x&application_name=y"),
            "postgres://db/trellis?sslpassword=***&application_name=y"
        );
        assert_eq!(redact_url("host=db password=x"), "<redacted>");
    }
}
