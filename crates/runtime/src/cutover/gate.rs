//! The cutover gate: a gated group pulls only while its gate is open, and stands by otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::consumer::{ConsumerGroup, Handler};
use crate::instrument::StandbyChanged;

impl<H: Handler> ConsumerGroup<H> {
    /// Pulls only while `gate` is open (the cutover flag names this process the executor).
    /// When it closes, the group makes no new pull request: it finishes the pull in hand and
    /// waits (`trellis_consumer_standby_state{consumer}` says so). Until the gate first opens,
    /// the consumers are not even declared. The pull in hand lasts at most `fetch_expiry`,
    /// which bounds the overlap with the new executor; the handler's idempotency absorbs it.
    /// The pull in hand is finished rather than handed back (nak):
    /// every hand-back would raise the messages' delivery count, and rapid flips could push a
    /// healthy message to `max_deliver` and the DLQ.
    pub fn gated(mut self, gate: tokio::sync::watch::Receiver<bool>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// True while the group waits for its gate to open (for `/readyz`: standing by is ready).
    pub fn standing_by_flag(&self) -> Arc<AtomicBool> {
        self.standing_by.clone()
    }

    /// Waits until the gate is open (at once without a gate); false if `stop` came first.
    pub(crate) async fn until_executor(
        &self,
        gate: &mut Option<tokio::sync::watch::Receiver<bool>>,
        stop: &CancellationToken,
    ) -> bool {
        let Some(gate) = gate else { return true };
        if *gate.borrow_and_update() {
            return true;
        }
        self.standing_by.store(true, Ordering::Release);
        StandbyChanged { consumer: &self.spec.name, standing_by: true }.emit();
        let open = tokio::select! {
            open = gate.wait_for(|open| *open) => open.is_ok(),
            _ = stop.cancelled() => false,
        };
        self.standing_by.store(false, Ordering::Release);
        StandbyChanged { consumer: &self.spec.name, standing_by: false }.emit();
        if open {
            tracing::info!(consumer = %self.spec.name, "the executor: pulling");
        }
        open
    }
}
