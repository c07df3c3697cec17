//! What a processor implements: a [`Handler`] of batches, or a [`MessageHandler`] run by
//! [`EachMessage`], and the [`Outcome`] it reports for each [`Delivery`].

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use tracing::Instrument as _;
use trellis_domain::events::Envelope;

/// What a handler decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect is durable: acknowledge.
    Done,
    /// A transient failure (database down, timeout): try again later.
    Retry(String),
    /// A permanent failure (validation, unknown type or version): dead-letter now.
    Reject(String),
}

/// One decoded message handed to a handler.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The subject the event was published on, without the deployment prefix (for a replay,
    /// the original subject, not the replay subject).
    pub subject: String,
    pub envelope: Envelope,
    pub stream_sequence: u64,
    /// 1 on the first delivery.
    pub deliveries: i64,
    /// How many times this message was replayed from the DLQ (0 if never).
    pub replays: u32,
    /// This delivery's process span: a child of the trace context the message carries (or
    /// linked to it, see `trace::ParentMode`). A handler's work on this message alone runs in
    /// it; the runner settles the message in it.
    pub span: tracing::Span,
    /// The trace context the message carries (the request's, through its outbox row).
    pub trace: Option<crate::trace::TraceHeaders>,
}

impl Delivery {
    /// The first delivery of `envelope`, published on `subject` at `stream_sequence` and never
    /// replayed.
    pub fn first(subject: impl Into<String>, envelope: Envelope, stream_sequence: u64) -> Self {
        Self {
            subject: subject.into(),
            envelope,
            stream_sequence,
            deliveries: 1,
            replays: 0,
            span: tracing::Span::none(),
            trace: None,
        }
    }
}

/// A handler of batches: one outcome per delivery, in order.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, batch: &[Delivery]) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// A handler of one message at a time.
pub trait MessageHandler: Send + Sync + 'static {
    fn handle_one(&self, delivery: &Delivery) -> impl Future<Output = Outcome> + Send;
}

/// Runs a [`MessageHandler`] over a batch with bounded concurrency; a panic fails only its
/// own message.
pub struct EachMessage<H> {
    pub handler: H,
    pub concurrency: usize,
}

impl<H: MessageHandler> Handler for EachMessage<H> {
    async fn handle(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let each: Vec<_> = batch.iter().map(|d| self.one(d)).collect();
        futures::stream::iter(each).buffered(self.concurrency.max(1)).collect().await
    }
}

impl<H: MessageHandler> EachMessage<H> {
    async fn one(&self, delivery: &Delivery) -> Outcome {
        let handled = AssertUnwindSafe(self.handler.handle_one(delivery)).catch_unwind();
        match handled.instrument(delivery.span.clone()).await {
            Ok(outcome) => outcome,
            Err(panic) => Outcome::Retry(format!("handler panicked: {}", panic_text(&panic))),
        }
    }
}

pub(super) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
