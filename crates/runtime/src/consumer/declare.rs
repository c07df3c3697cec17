//! Declaring and verifying a group's consumers: the main consumer, its replay consumer and the
//! two MAX_DELIVERIES advisory consumers, each created (or updated) and checked against what
//! the server kept.

use std::sync::atomic::Ordering;

use async_nats::jetstream::{self, consumer};

use super::{ConsumerGroup, Handler, PullConsumer};
use crate::dlq;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("JetStream request for consumer {consumer} failed: {message}")]
    Request { consumer: String, message: String },
    #[error(
        "consumer {consumer} on {stream}: the server did not keep the configuration asked for ({field}: asked {asked}, \
         got {got}); nats-server 2.9 silently ignores some settings (e.g. filter_subjects) — upgrade it or change the \
         consumer"
    )]
    Mismatch { consumer: String, stream: String, field: &'static str, asked: String, got: String },
    #[error("consumer {consumer} on {stream}: the server refused its configuration: {message}")]
    Refused { consumer: String, stream: String, message: String },
}

impl<H: Handler> ConsumerGroup<H> {
    /// Deletes the group's durable consumers (main, replay and the two MAX_DELIVERIES
    /// watchers); an absent one is not an error. For a shadow candidate whose period ended: the
    /// next period starts afresh instead of with the backlog of the gap.
    pub async fn delete_consumers(&self) -> Result<(), ConsumerError> {
        let t = &self.ctx.topology;
        let durable = self.durable();
        for (stream, name) in [
            (t.events_stream(), durable.clone()),
            (t.replay_stream(), durable.clone()),
            (t.advisory_stream(), durable.clone()),
            (t.advisory_stream(), format!("{durable}-replays")),
        ] {
            let request =
                |e: &dyn std::fmt::Display| ConsumerError::Request { consumer: name.clone(), message: e.to_string() };
            let s = self.ctx.js.get_stream(&stream).await.map_err(|e| request(&e))?;
            match s.delete_consumer(&name).await {
                Ok(_) => {}
                Err(e) => match e.kind() {
                    jetstream::stream::ConsumerErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND => {}
                    _ => return Err(request(&e)),
                },
            }
        }
        self.bound.store(false, Ordering::Release);
        Ok(())
    }

    fn main_config(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(self.durable()),
            description: Some(format!("trellis consumer group {}", self.spec.name)),
            filter_subject: self.ctx.topology.subject(&self.spec.filter_subject),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: self.config.max_deliver,
            max_ack_pending: self.config.max_ack_pending,
            deliver_policy: if self.new_messages_only {
                consumer::DeliverPolicy::New
            } else {
                consumer::DeliverPolicy::All
            },
            ..Default::default()
        }
    }

    fn replay_config(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            filter_subject: self.ctx.topology.subject(&format!("replay.{}.>", self.spec.name)),
            description: Some(format!("trellis replays for {}", self.spec.name)),
            ..self.main_config()
        }
    }

    /// The safety net's consumer of the MAX_DELIVERIES advisories about this group's consumer on
    /// `stream`. A consumer has one filter subject (nats-server 2.9), and the advisory stream only
    /// holds `<advisory>.<this deployment's stream>.>` (a wildcard in the stream token would not
    /// be a subset of it), so there is one per source stream, each with a durable of its own.
    fn advisory_config(&self, stream: &str, durable: String) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(durable),
            filter_subject: format!("{}.{stream}.{}", dlq::MAX_DELIVERIES_ADVISORY, self.durable()),
            description: Some(format!("trellis MAX_DELIVERIES safety net for {} on {stream}", self.spec.name)),
            max_deliver: -1,
            ..self.main_config()
        }
    }

    /// Declares (idempotently) and verifies the four consumers.
    pub async fn bind(&self) -> Result<Bound, ConsumerError> {
        let t = &self.ctx.topology;
        let main = declare(&self.ctx.js, &t.events_stream(), self.main_config()).await?;
        let replay = declare(&self.ctx.js, &t.replay_stream(), self.replay_config()).await?;
        let main_advisory = self.advisory_config(&t.events_stream(), self.durable());
        let main_advisory = declare(&self.ctx.js, &t.advisory_stream(), main_advisory).await?;
        let replay_advisory = self.advisory_config(&t.replay_stream(), format!("{}-replays", self.durable()));
        let replay_advisory = declare(&self.ctx.js, &t.advisory_stream(), replay_advisory).await?;
        self.bound.store(true, Ordering::Release);
        Ok(Bound { main, replay, advisories: [main_advisory, replay_advisory] })
    }
}

/// The bound consumers of a group.
pub struct Bound {
    pub(super) main: PullConsumer,
    pub(super) replay: PullConsumer,
    /// MAX_DELIVERIES advisories about `main` and about `replay`.
    pub(super) advisories: [PullConsumer; 2],
}

/// Creates the consumer, or updates it to `wanted`, and checks the server kept what matters.
async fn declare(
    js: &jetstream::Context,
    stream: &str,
    wanted: consumer::pull::Config,
) -> Result<PullConsumer, ConsumerError> {
    let name = wanted.durable_name.clone().unwrap_or_default();
    let request = |e: &dyn std::fmt::Display| ConsumerError::Request { consumer: name.clone(), message: e.to_string() };
    let s = js.get_stream(stream).await.map_err(|e| request(&e))?;
    let mut c: PullConsumer = s.create_consumer(wanted.clone()).await.map_err(|e| match e.kind() {
        // The cluster has no quorum or leader now: retried.
        jetstream::stream::ConsumerErrorKind::JetStream(j) if crate::nats::is_transient(j.error_code()) => request(&e),
        // The server answered and said no: retrying will not change its mind.
        jetstream::stream::ConsumerErrorKind::JetStream(refusal) => {
            ConsumerError::Refused { consumer: name.clone(), stream: stream.to_owned(), message: refusal.to_string() }
        }
        _ => request(&e),
    })?;
    let got = c.info().await.map_err(|e| request(&e))?.config.clone();
    let mismatch = |field, asked: String, got: String| ConsumerError::Mismatch {
        consumer: name.clone(),
        stream: stream.to_owned(),
        field,
        asked,
        got,
    };
    if got.filter_subject != wanted.filter_subject || !got.filter_subjects.is_empty() {
        return Err(mismatch(
            "filter_subject",
            wanted.filter_subject.clone(),
            format!("{:?} / filter_subjects {:?}", got.filter_subject, got.filter_subjects),
        ));
    }
    if got.ack_policy != wanted.ack_policy {
        return Err(mismatch("ack_policy", format!("{:?}", wanted.ack_policy), format!("{:?}", got.ack_policy)));
    }
    if got.max_deliver != wanted.max_deliver {
        return Err(mismatch("max_deliver", wanted.max_deliver.to_string(), got.max_deliver.to_string()));
    }
    if got.ack_wait != wanted.ack_wait {
        return Err(mismatch("ack_wait", format!("{:?}", wanted.ack_wait), format!("{:?}", got.ack_wait)));
    }
    if got.max_ack_pending != wanted.max_ack_pending {
        return Err(mismatch("max_ack_pending", wanted.max_ack_pending.to_string(), got.max_ack_pending.to_string()));
    }
    Ok(c)
}
