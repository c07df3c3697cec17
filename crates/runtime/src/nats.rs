//! The NATS connection and the JetStream topology (DESIGN.md §3): stream names, subjects and
//! their idempotent declaration with a check that the server kept what was asked.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// Stream, subject and consumer names under one deployment prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid NATS prefix {0:?}: use only letters, digits, '-' and '_'")]
pub struct InvalidPrefix(String);

impl Topology {
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        if !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(InvalidPrefix(prefix.to_owned()));
        }
        Ok(Self { prefix: prefix.to_owned() })
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

    /// The streams of DESIGN.md §3, as this deployment names them.
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
                ..Default::default()
            },
        ]
    }
}

/// Connects to NATS. The connection retries in the background when the server is down at
/// start-up, so a process can start and report "degraded" instead of exiting.
pub async fn connect(url: &str, name: &str, request_timeout: Duration) -> anyhow::Result<async_nats::Client> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .request_timeout(Some(request_timeout))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                other => tracing::info!(event = %other, "NATS event"),
            }
        })
        .connect(url)
        .await?;
    Ok(client)
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
    let mut info = match js.get_stream(&wanted.name).await {
        Ok(mut s) => s.info().await.map_err(|e| request(&e))?.config.clone(),
        Err(_) => js.create_stream(wanted.clone()).await.map_err(|e| request(&e))?.cached_info().config.clone(),
    };
    if verify(wanted, &info).is_err() {
        info = js.update_stream(wanted.clone()).await.map_err(|e| request(&e))?.config;
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
}
