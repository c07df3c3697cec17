//! How full the streams are, as metrics: `trellis_stream_stored_bytes`, `trellis_stream_stored_messages` and
//! `trellis_stream_limit_ratio` (bytes / `max_bytes`; 0 for a stream without a byte limit),
//! labelled `stream` with the stream's base name (`EVENTS`, `DLQ`, `REPLAY`, `ADVISORIES`),
//! whatever the deployment's prefix. The outbox relay polls them (`trellis-api`), as it polls the
//! outbox's backlog; `TrellisStreamFilling` alerts before a stream is full.

use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::nats::Topology;

/// How often [`run`] reads the streams' state.
pub const POLL_EVERY: Duration = Duration::from_secs(15);

/// The streams, each by its base name (the metrics' label) and this deployment's name.
fn streams(topology: &Topology) -> [(&'static str, String); 4] {
    [
        ("EVENTS", topology.events_stream()),
        ("DLQ", topology.dlq_stream()),
        ("REPLAY", topology.replay_stream()),
        ("ADVISORIES", topology.advisory_stream()),
    ]
}

/// Exports every series at zero, so that they exist from start-up.
pub fn register(topology: &Topology) {
    crate::instrument::register_streams(&streams(topology).map(|(label, _)| label));
}

/// Reads each stream's state once and updates its series; a stream that cannot be read keeps
/// its last values (and the error is returned after the others are read).
pub async fn poll(js: &jetstream::Context, topology: &Topology) -> anyhow::Result<()> {
    let mut failed = None;
    for (label, name) in streams(topology) {
        let info = match js.get_stream(&name).await {
            Ok(mut stream) => stream.info().await.map(|i| (i.state.bytes, i.state.messages, i.config.max_bytes)),
            Err(e) => {
                failed = Some(anyhow::anyhow!("reading stream {name}: {e}"));
                continue;
            }
        };
        match info {
            Ok((bytes, messages, max_bytes)) => {
                crate::instrument::StreamSampled { stream: label, bytes, messages, max_bytes }.emit()
            }
            Err(e) => failed = Some(anyhow::anyhow!("reading stream {name}: {e}")),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Polls every `every` until `stop`.
pub async fn run(js: jetstream::Context, topology: Topology, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = poll(&js, &topology).await {
            tracing::debug!(error = format!("{e:#}"), "sampling the streams' state failed");
        }
    }
}
