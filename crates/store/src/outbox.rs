//! The transactional outbox as the relay and the operators see it: events are written in the
//! transaction of the change they describe (by `trellis_commands::commit`, the one writer of
//! `ops.outbox` rows), and the relay claims, publishes and marks them afterwards.

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

/// One claimed, not yet published event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingEvent {
    pub seq: i64,
    pub id: Uuid,
    pub subject: String,
    /// The envelope as JSON text, exactly as it goes on the wire.
    pub payload: String,
    /// The W3C trace context of the span that wrote the event, if any.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Locks up to `limit` unpublished events, oldest first, skipping rows another relay holds.
/// The locks last until the caller's transaction ends.
pub async fn claim(conn: &mut PgConnection, limit: i64) -> Result<Vec<PendingEvent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, id, subject, payload::text AS payload, traceparent, tracestate FROM ops.outbox
         WHERE published_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

pub async fn mark_published(conn: &mut PgConnection, seqs: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE ops.outbox SET published_at = now() WHERE seq = ANY($1)").bind(seqs).execute(conn).await?;
    Ok(())
}

/// Events written but not yet acknowledged by JetStream.
pub async fn pending_count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM ops.outbox WHERE published_at IS NULL").fetch_one(pool).await
}

/// Age of the oldest unpublished event, in seconds (0 when there is none).
pub async fn oldest_pending_age_seconds(pool: &PgPool) -> Result<f64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
         FROM ops.outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await
}

/// Deletes up to `batch` events published before `before`; returns how many went.
pub async fn prune(pool: &PgPool, before: OffsetDateTime, batch: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM ops.outbox WHERE seq IN (
             SELECT seq FROM ops.outbox WHERE published_at IS NOT NULL AND published_at < $1
             ORDER BY published_at LIMIT $2)",
    )
    .bind(before)
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Marks every event created since `since` as unpublished again, so the relay re-sends it
/// (JetStream's duplicate window drops those it still has). Returns how many were reset.
pub async fn reset_published_since(pool: &PgPool, since: OffsetDateTime) -> Result<u64, sqlx::Error> {
    let done =
        sqlx::query("UPDATE ops.outbox SET published_at = NULL WHERE created_at >= $1 AND published_at IS NOT NULL")
            .bind(since)
            .execute(pool)
            .await?;
    Ok(done.rows_affected())
}
