//! The NATS connection and the JetStream topology (docs/design/contracts.md §3): stream names, subjects and
//! their idempotent declaration with a check that the server kept what was asked.

use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, stream};

use crate::config::{Secret, SecretUrl};
use crate::nats_options::{Auth, NatsOptions};

/// Stream, subject and consumer names under one deployment prefix, and the streams' sizing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    streams: StreamSettings,
}

/// Replicas and byte limits of the streams (docs/ARCHITECTURE.md, "JetStream topology").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// Replicas of every stream; consumers inherit it.
    pub replicas: usize,
    /// `max_bytes` of each stream; -1: unlimited.
    pub events_max_bytes: i64,
    pub dlq_max_bytes: i64,
    pub replay_max_bytes: i64,
    pub advisories_max_bytes: i64,
}

impl StreamSettings {
    /// One replica and no byte limit: what [`Topology::new`] declares (tests, tools). nats-server
    /// reserves a stream's `max_bytes` against its whole store when the stream is created, so a
    /// server shared by many prefixes runs out of reservations long before it runs out of disk.
    pub const UNLIMITED: Self =
        Self { replicas: 1, events_max_bytes: -1, dlq_max_bytes: -1, replay_max_bytes: -1, advisories_max_bytes: -1 };
}

/// Replicas and byte limits of the streams, as flags (every long-running binary declares them).
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// Replicas of every stream (1 on a single server; 3 on a three-node JetStream cluster).
    /// Consumers inherit it. Asking for more replicas than the cluster has servers is an error.
    #[arg(long, env = "TRELLIS_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub stream_replicas: u8,
    /// `max_bytes` of the EVENTS stream (`10GiB`, `512MiB`, bytes, or `unlimited`). When full, a
    /// publish is refused (discard `new`): the outbox keeps the events and retries.
    #[arg(long, env = "TRELLIS_EVENTS_STREAM_MAX_BYTES", default_value = "10GiB", value_parser = parse_bytes)]
    pub events_stream_max_bytes: i64,
    /// `max_bytes` of the DLQ stream. When full, a dead letter is refused (discard `new`): its
    /// original is not terminated and stays in its consumer.
    #[arg(long, env = "TRELLIS_DLQ_STREAM_MAX_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub dlq_stream_max_bytes: i64,
    /// `max_bytes` of the REPLAY stream. When full, `trellisctl dlq replay` is refused (discard
    /// `new`) and says so; the dead letters stay in the DLQ.
    #[arg(long, env = "TRELLIS_REPLAY_STREAM_MAX_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub replay_stream_max_bytes: i64,
    /// `max_bytes` of the ADVISORIES stream. When full, the oldest advisories go (discard `old`):
    /// the safety net has handled them long before.
    #[arg(long, env = "TRELLIS_ADVISORIES_STREAM_MAX_BYTES", default_value = "256MiB", value_parser = parse_bytes)]
    pub advisories_stream_max_bytes: i64,
}

impl StreamArgs {
    pub fn settings(&self) -> StreamSettings {
        StreamSettings {
            replicas: usize::from(self.stream_replicas),
            events_max_bytes: self.events_stream_max_bytes,
            dlq_max_bytes: self.dlq_stream_max_bytes,
            replay_max_bytes: self.replay_stream_max_bytes,
            advisories_max_bytes: self.advisories_stream_max_bytes,
        }
    }
}

/// A byte size: a number of bytes, or one with a unit (`KiB`, `MiB`, `GiB`, `TiB`; `KB`, `MB`,
/// `GB`, `TB` are powers of 1000), or `unlimited` (-1).
pub fn parse_bytes(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") || t == "-1" {
        return Ok(-1);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: i64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: write e.g. 10GiB, 512MiB, 1048576 or unlimited"))?;
    let factor: i64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ));
        }
    };
    let bytes = number.checked_mul(factor).ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        return Err("a stream's max_bytes of 0 would refuse every message: give a size or `unlimited`".into());
    }
    Ok(bytes)
}

#[derive(Debug, thiserror::Error)]
#[error("invalid NATS prefix {0:?}: use only letters, digits, '-' and '_'")]
pub struct InvalidPrefix(String);

impl Topology {
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        if !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(InvalidPrefix(prefix.to_owned()));
        }
        Ok(Self { prefix: prefix.to_owned(), streams: StreamSettings::UNLIMITED })
    }

    /// This topology with the streams sized as `streams` says.
    pub fn with_streams(self, streams: StreamSettings) -> Self {
        Self { streams, ..self }
    }

    pub fn streams(&self) -> &StreamSettings {
        &self.streams
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A stream or consumer name: `EVENTS`, or `<prefix>_EVENTS`.
    pub fn name(&self, base: &str) -> String {
        if self.prefix.is_empty() { base.to_owned() } else { format!("{}_{base}", self.prefix) }
    }

    /// A subject: `events.x.y`, or `<prefix>.events.x.y`.
    pub fn subject(&self, base: &str) -> String {
        if self.prefix.is_empty() { base.to_owned() } else { format!("{}.{base}", self.prefix) }
    }

    /// The subject without the prefix (inverse of [`Topology::subject`]).
    pub fn unprefixed<'a>(&self, subject: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            return subject;
        }
        subject.strip_prefix(&self.prefix).and_then(|s| s.strip_prefix('.')).unwrap_or(subject)
    }

    pub fn events_stream(&self) -> String {
        self.name("EVENTS")
    }

    pub fn dlq_stream(&self) -> String {
        self.name("DLQ")
    }

    pub fn replay_stream(&self) -> String {
        self.name("REPLAY")
    }

    pub fn advisory_stream(&self) -> String {
        self.name("ADVISORIES")
    }

    /// The streams of docs/design/contracts.md §3, as this deployment names them.
    pub fn stream_configs(&self) -> Vec<stream::Config> {
        vec![
            stream::Config {
                name: self.events_stream(),
                description: Some("Trellis domain events, published by the outbox relay".into()),
                subjects: vec![self.subject("events.>")],
                // Several consumers read the same subjects: work-queue retention forbids that.
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(7 * 24 * 3600),
                duplicate_window: Duration::from_secs(120),
                // Full: a publish is refused and the outbox retries, rather than an event a
                // consumer has not read yet disappearing.
                discard: stream::DiscardPolicy::New,
                max_bytes: self.streams.events_max_bytes,
                num_replicas: self.streams.replicas,
                ..Default::default()
            },
            stream::Config {
                name: self.dlq_stream(),
                description: Some("Dead letters, one subject per consumer".into()),
                subjects: vec![self.subject("dlq.>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(90 * 24 * 3600),
                duplicate_window: Duration::from_secs(120),
                // Full: a dead letter is refused and its original stays in its consumer.
                discard: stream::DiscardPolicy::New,
                max_bytes: self.streams.dlq_max_bytes,
                num_replicas: self.streams.replicas,
                ..Default::default()
            },
            stream::Config {
                name: self.replay_stream(),
                description: Some("Dead letters sent back to the one consumer that failed them".into()),
                subjects: vec![self.subject("replay.>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(14 * 24 * 3600),
                duplicate_window: Duration::from_secs(120),
                discard: stream::DiscardPolicy::New,
                max_bytes: self.streams.replay_max_bytes,
                num_replicas: self.streams.replicas,
                ..Default::default()
            },
            stream::Config {
                name: self.advisory_stream(),
                description: Some(
                    "MAX_DELIVERIES advisories of this deployment's consumers: the DLQ safety net".into(),
                ),
                subjects: [self.events_stream(), self.replay_stream()]
                    .iter()
                    .map(|s| format!("{}.{s}.>", crate::dlq::MAX_DELIVERIES_ADVISORY))
                    .collect(),
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(7 * 24 * 3600),
                duplicate_window: Duration::from_secs(120),
                // Full: the oldest advisories go; the safety net handled them long before.
                discard: stream::DiscardPolicy::Old,
                max_bytes: self.streams.advisories_max_bytes,
                num_replicas: self.streams.replicas,
                ..Default::default()
            },
        ]
    }
}

/// Connects to NATS with `options` (credentials and TLS: [`NatsOptions`]). The connection
/// retries in the background when the server is down at start-up, so a process can start and
/// report "degraded" instead of exiting; options that are wrong (a conflict, a missing file) are
/// an error at once.
pub async fn connect(
    options: &NatsOptions,
    name: &str,
    request_timeout: Duration,
) -> anyhow::Result<async_nats::Client> {
    let resolved = options.resolve()?;
    let connect = resolved
        .connect_options()?
        .name(name)
        .retry_on_initial_connect()
        .request_timeout(Some(request_timeout))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                async_nats::Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
                other => tracing::info!(event = %other, "NATS event"),
            }
        });
    Ok(connect.connect(resolved.addresses).await?)
}

/// Connects to NATS with `options` once, without retrying (a command-line tool): an unreachable
/// server, refused credentials or a certificate that does not verify are an error naming the
/// server (redacted).
pub async fn connect_once(
    options: &NatsOptions,
    name: &str,
    request_timeout: Duration,
) -> anyhow::Result<async_nats::Client> {
    let resolved = options.resolve()?;
    let connect = resolved.connect_options()?.name(name).request_timeout(Some(request_timeout));
    connect.connect(resolved.addresses).await.map_err(|e| anyhow::anyhow!("connecting to NATS at {}: {e}", options.url))
}

/// The servers of a NATS URL (or comma-separated list), without credentials, and the
/// credentials they carried. async-nats logs a server's address (`Debug`, password included)
/// while it connects, so credentials travel as connect options, never inside an address.
#[derive(Debug)]
pub struct Servers {
    pub addresses: Vec<async_nats::ServerAddr>,
    credentials: Option<NatsCredentials>,
}

enum NatsCredentials {
    UserPassword { user: String, password: Secret },
    Token(Secret),
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UserPassword { user, password } => write!(f, "UserPassword({user}, {password:?})"),
            Self::Token(token) => write!(f, "Token({token:?})"),
        }
    }
}

impl PartialEq for NatsCredentials {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::UserPassword { user: a, password: p }, Self::UserPassword { user: b, password: q }) => {
                a == b && p == q
            }
            (Self::Token(a), Self::Token(b)) => a == b,
            _ => false,
        }
    }
}

impl Servers {
    /// Splits `url`: `nats://user:password@host` is a user and password, `nats://token@host` a
    /// token (as nats-server reads them). Every server of a list must carry the same credentials,
    /// or none. Errors name the URL redacted.
    pub fn parse(url: &SecretUrl) -> anyhow::Result<Self> {
        let mut addresses = Vec::new();
        let mut credentials: Option<NatsCredentials> = None;
        for one in url.expose().split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let address: async_nats::ServerAddr =
                one.parse().map_err(|e| anyhow::anyhow!("invalid NATS_URL {url}: {e}"))?;
            let mut inner = address.into_inner();
            let found = match (inner.username(), inner.password()) {
                ("", None) => None,
                (user, Some(password)) => Some(NatsCredentials::UserPassword {
                    user: percent_decode(user),
                    password: Secret::new(percent_decode(password)),
                }),
                (token, None) => Some(NatsCredentials::Token(Secret::new(percent_decode(token)))),
            };
            if let Some(found) = found {
                match &credentials {
                    Some(known) if *known != found => {
                        anyhow::bail!("the servers of NATS_URL {url} carry different credentials")
                    }
                    _ => credentials = Some(found),
                }
            } else if credentials.is_some() {
                anyhow::bail!("the servers of NATS_URL {url} carry different credentials");
            }
            let _ = inner.set_password(None);
            let _ = inner.set_username("");
            addresses.push(
                async_nats::ServerAddr::from_url(inner).map_err(|e| anyhow::anyhow!("invalid NATS_URL {url}: {e}"))?,
            );
        }
        anyhow::ensure!(!addresses.is_empty(), "NATS_URL names no server");
        Ok(Self { addresses, credentials })
    }

    /// The credentials the URL carried, if any.
    pub fn auth(&self) -> Option<Auth> {
        match &self.credentials {
            None => None,
            Some(NatsCredentials::UserPassword { user, password }) => {
                Some(Auth::UserPassword { user: user.clone(), password: password.clone() })
            }
            Some(NatsCredentials::Token(token)) => Some(Auth::Token(token.clone())),
        }
    }
}

/// `%XX` escapes of a URL's user part decoded (an invalid escape stays as written).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a JetStream API error is the cluster's passing state rather than an answer about the
/// request: no meta leader or quorum now (10008, "JetStream system temporarily unavailable"), or
/// a leader that changed while the request was handled (10009). Retried like an unreachable
/// server, never taken for a refusal of the configuration: a worker whose consumer was being
/// declared while its cluster had lost its quorum exited instead of waiting for it.
pub fn is_transient(code: jetstream::ErrorCode) -> bool {
    code == jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE || code == jetstream::ErrorCode::CLUSTER_NOT_LEADER
}

/// A JetStream context whose requests and publish acknowledgements time out.
pub fn jetstream(client: async_nats::Client, timeout: Duration) -> jetstream::Context {
    jetstream::context::ContextBuilder::new()
        .timeout(timeout)
        .ack_timeout(timeout)
        .backpressure_on_inflight(true)
        .build(client)
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("JetStream request for stream {stream} failed: {message}")]
    Request { stream: String, message: String },
    #[error(
        "stream {stream}: the server did not keep the configuration asked for ({field}: asked {asked}, got {got}); \
         check the nats-server version (2.9 silently ignores some settings) and any stream of that name \
         created by hand"
    )]
    Mismatch { stream: String, field: &'static str, asked: String, got: String },
    #[error(
        "stream {stream}: asked for {replicas} replicas, but the NATS server is not clustered (or its JetStream \
         cluster has fewer servers than replicas): set TRELLIS_STREAM_REPLICAS=1 for a single server, or run a \
         JetStream cluster of at least {replicas} servers ({message})"
    )]
    NotClustered { stream: String, replicas: usize, message: String },
    #[error("stream {stream}: the server refused its configuration: {message}")]
    Refused { stream: String, message: String },
}

impl TopologyError {
    /// Whether retrying cannot help: the server answered, and said no (or kept something else).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Request { .. })
    }
}

/// Creates or updates each stream and verifies the server's view of it field by field.
pub async fn ensure_streams(js: &jetstream::Context, topology: &Topology) -> Result<(), TopologyError> {
    for wanted in topology.stream_configs() {
        ensure_stream(js, &wanted).await?;
    }
    Ok(())
}

async fn ensure_stream(js: &jetstream::Context, wanted: &stream::Config) -> Result<(), TopologyError> {
    let request =
        |e: &dyn std::fmt::Display| TopologyError::Request { stream: wanted.name.clone(), message: e.to_string() };
    let refused = |e: CreateStreamError| match e.kind() {
        CreateStreamErrorKind::JetStream(j) if is_transient(j.error_code()) => request(&e),
        CreateStreamErrorKind::JetStream(j) => {
            let code = j.error_code();
            let replicas = code == jetstream::ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
                || (wanted.num_replicas > 1 && code == jetstream::ErrorCode::INSUFFICIENT_RESOURCES);
            if replicas {
                TopologyError::NotClustered {
                    stream: wanted.name.clone(),
                    replicas: wanted.num_replicas,
                    message: j.to_string(),
                }
            } else {
                TopologyError::Refused { stream: wanted.name.clone(), message: j.to_string() }
            }
        }
        _ => request(&e),
    };
    let mut info = match js.get_stream(&wanted.name).await {
        Ok(mut s) => s.info().await.map_err(|e| request(&e))?.config.clone(),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {
            js.create_stream(wanted.clone()).await.map_err(refused)?.cached_info().config.clone()
        }
        Err(e) => return Err(request(&e)),
    };
    if verify(wanted, &info).is_err() {
        info = js.update_stream(wanted.clone()).await.map_err(refused)?.config;
    }
    verify(wanted, &info)
}

fn verify(wanted: &stream::Config, got: &stream::Config) -> Result<(), TopologyError> {
    let mismatch =
        |field, asked: String, got: String| TopologyError::Mismatch { stream: wanted.name.clone(), field, asked, got };
    if wanted.subjects != got.subjects {
        return Err(mismatch("subjects", format!("{:?}", wanted.subjects), format!("{:?}", got.subjects)));
    }
    if wanted.retention != got.retention {
        return Err(mismatch("retention", format!("{:?}", wanted.retention), format!("{:?}", got.retention)));
    }
    if wanted.storage != got.storage {
        return Err(mismatch("storage", format!("{:?}", wanted.storage), format!("{:?}", got.storage)));
    }
    if wanted.duplicate_window != got.duplicate_window {
        return Err(mismatch(
            "duplicate_window",
            format!("{:?}", wanted.duplicate_window),
            format!("{:?}", got.duplicate_window),
        ));
    }
    if wanted.max_age != got.max_age {
        return Err(mismatch("max_age", format!("{:?}", wanted.max_age), format!("{:?}", got.max_age)));
    }
    if wanted.max_bytes != got.max_bytes {
        return Err(mismatch("max_bytes", wanted.max_bytes.to_string(), got.max_bytes.to_string()));
    }
    if wanted.discard != got.discard {
        return Err(mismatch("discard", format!("{:?}", wanted.discard), format!("{:?}", got.discard)));
    }
    if wanted.num_replicas != got.num_replicas {
        // A server that is not clustered may keep one replica instead of refusing.
        return Err(TopologyError::NotClustered {
            stream: wanted.name.clone(),
            replicas: wanted.num_replicas,
            message: format!("the server kept {} replicas", got.num_replicas),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_take_the_prefix() {
        let t = Topology::new("t1").unwrap();
        assert_eq!(t.events_stream(), "t1_EVENTS");
        assert_eq!(t.subject("events.>"), "t1.events.>");
        assert_eq!(t.unprefixed("t1.events.a.b"), "events.a.b");
        let plain = Topology::new("").unwrap();
        assert_eq!(plain.events_stream(), "EVENTS");
        assert_eq!(plain.subject("events.>"), "events.>");
        assert!(Topology::new("a.b").is_err());
        assert!(Topology::new("a b").is_err());
    }

    #[test]
    fn only_a_cluster_without_quorum_or_leader_is_transient() {
        use jetstream::ErrorCode;
        assert!(is_transient(ErrorCode::CLUSTER_NOT_AVAILABLE) && is_transient(ErrorCode::CLUSTER_NOT_LEADER));
        for refusal in
            [ErrorCode::STREAM_NOT_FOUND, ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED, ErrorCode::CONSUMER_NAME_EXIST]
        {
            assert!(!is_transient(refusal), "{refusal:?}");
        }
    }
}

#[cfg(test)]
mod settings_tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        streams: StreamArgs,
    }

    #[test]
    fn sizes_parse_with_units_and_unlimited_and_bad_ones_say_why() {
        assert_eq!(parse_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("unlimited"), Ok(-1));
        assert!(parse_bytes("0").unwrap_err().contains("refuse every message"));
        assert!(parse_bytes("10 parsecs").unwrap_err().contains("unknown size unit"));
        assert!(parse_bytes("lots").unwrap_err().contains("is not a size"));
    }

    #[test]
    fn the_defaults_are_one_replica_and_the_documented_limits() {
        let settings = Flags::try_parse_from(["t"]).unwrap().streams.settings();
        assert_eq!(
            settings,
            StreamSettings {
                replicas: 1,
                events_max_bytes: 10 << 30,
                dlq_max_bytes: 1 << 30,
                replay_max_bytes: 1 << 30,
                advisories_max_bytes: 256 << 20,
            }
        );
        let three =
            Flags::try_parse_from(["t", "--stream-replicas", "3", "--events-stream-max-bytes", "1GiB"]).unwrap();
        assert_eq!((three.streams.settings().replicas, three.streams.settings().events_max_bytes), (3, 1 << 30));
        assert!(Flags::try_parse_from(["t", "--stream-replicas", "0"]).is_err());
        let topology = Topology::new("").unwrap().with_streams(three.streams.settings());
        let configs = topology.stream_configs();
        assert_eq!(
            configs.iter().map(|c| (c.num_replicas, c.discard)).collect::<Vec<_>>(),
            [
                (3, stream::DiscardPolicy::New),
                (3, stream::DiscardPolicy::New),
                (3, stream::DiscardPolicy::New),
                (3, stream::DiscardPolicy::Old)
            ]
        );
    }
}

#[cfg(test)]
mod credential_tests {
    use super::*;

    #[test]
    fn credentials_leave_the_addresses_and_travel_as_options() {
        let servers = Servers::parse(&SecretUrl::new("nats://app:p%40ss@a:4222,nats://app:p%40ss@b:4223")).unwrap();
        let shown = format!("{servers:?}");
        assert!(!shown.contains("p@ss") && !shown.contains("p%40ss"), "{shown}");
        for address in &servers.addresses {
            assert!(!address.has_user_pass() && address.password().is_none(), "{}", address.as_url_str());
        }
        assert!(matches!(
            &servers.credentials,
            Some(NatsCredentials::UserPassword { user, password }) if user == "app" && password.expose() == "p@ss"
        ));
        let token = Servers::parse(&SecretUrl::new("nats://s3cr3t-token@a")).unwrap();
        assert!(matches!(&token.credentials, Some(NatsCredentials::Token(t)) if t.expose() == "s3cr3t-token"));
    }

    #[test]
    fn servers_with_different_credentials_are_refused_without_quoting_them() {
        let err = Servers::parse(&SecretUrl::new("nats://u:one-pw@a,nats://u:two-pw@b")).unwrap_err().to_string();
        assert!(err.contains("different credentials") && !err.contains("one-pw") && !err.contains("two-pw"), "{err}");
        let err = Servers::parse(&SecretUrl::new("http://u:pw-in-url@a")).unwrap_err().to_string();
        assert!(!err.contains("pw-in-url"), "{err}");
    }
}
