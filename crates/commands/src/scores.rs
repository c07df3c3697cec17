//! Trust-score runs: asking for one, and recording one's results.

use std::time::Instant;

use sqlx::{PgConnection, Postgres, Transaction};
use time::OffsetDateTime;
use trellis_domain::events::{Event, EventPayload, EventType, ScoreRunRequested, ScoresUpdated, UserScore};
use trellis_domain::{EventId, UserId};
use trellis_store::scores::RunResult;

use crate::{Committer, Committing, Emitted};

/// Scores per `scores.updated` event.
pub const EVENT_CHUNK: usize = 1000;

/// Asks for a run: `scores.run_requested`, caused by `requested_by`. The score orchestrator,
/// wherever it runs, serves it. Returns the event's id, which names the request.
pub fn request_run(requested_by: Option<UserId>, reason: &str, at: OffsetDateTime) -> Emitted<EventId> {
    let payload = EventPayload::ScoreRunRequested(ScoreRunRequested { requested_by, reason: reason.to_owned() });
    let emitted = Emitted::none().with(&payload, requested_by, at);
    let id = emitted.ready_events().next().expect("one event").envelope.id;
    emitted.map(|()| id)
}

/// Writes a run's changed scores and removes the scores of users no longer active, in `tx`,
/// each statement taking at most `timeout`: `scores.updated`, one event per [`EVENT_CHUNK`]
/// changed scores, built as they are written. Commit it with [`finish_run`], which records the
/// run as succeeded with the duration of its write phase.
pub async fn record_run(
    tx: &mut PgConnection,
    result: &RunResult<'_>,
    timeout: std::time::Duration,
) -> Result<Emitted, sqlx::Error> {
    trellis_store::scores::write_scores(tx, result, timeout).await?;
    let run_id = result.run_id;
    let scores: Vec<UserScore> =
        result.changed.iter().map(|s| UserScore { user_id: UserId(s.user_id), score: s.score }).collect();
    let now = OffsetDateTime::now_utc();
    let chunks = scores.len().div_ceil(EVENT_CHUNK);
    let events = (0..chunks).map(move |i| {
        let chunk = scores[i * EVENT_CHUNK..((i + 1) * EVENT_CHUNK).min(scores.len())].to_vec();
        Event::new(&EventPayload::ScoresUpdated(ScoresUpdated { run_id, scores: chunk }), None, now)
    });
    Ok(Emitted::none().with_deferred(EventType::ScoresUpdated, events))
}

/// The committer of a run's write transaction: once its events are written, the run is marked
/// succeeded with its figures and the time its write phase took since `started`, then
/// committed, so that the run's results, events and record become visible together.
pub fn finish_run<'a>(result: &'a RunResult<'a>, started: Instant) -> FinishRun<'a> {
    FinishRun { result, started }
}

/// See [`finish_run`].
pub struct FinishRun<'a> {
    result: &'a RunResult<'a>,
    started: Instant,
}

impl<'c, 'a: 'c> Committer<'c> for FinishRun<'a> {
    fn commit(self, mut tx: Transaction<'c, Postgres>) -> Committing<'c> {
        Box::pin(async move {
            let write_ms = self.started.elapsed().as_millis() as i64;
            trellis_store::scores::mark_succeeded(&mut tx, self.result, write_ms).await?;
            tx.commit().await
        })
    }
}
