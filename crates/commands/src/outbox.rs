//! Writing `ops.outbox` rows: private to this crate, so that [`crate::commit_with`] is the only
//! way to write one.

use sqlx::PgConnection;
use time::OffsetDateTime;
use trellis_domain::events::Event;
use uuid::Uuid;

use crate::Part;

/// Events per statement of a deferred run: a score run's chunks are about 50 KB each.
const DEFERRED_PER_STATEMENT: usize = 20;

/// Writes every event of `parts`, in order, to `ops.outbox` on the caller's transaction.
pub(crate) async fn write(conn: &mut PgConnection, parts: Vec<Part>) -> Result<(), sqlx::Error> {
    let mut ready = Vec::new();
    for part in parts {
        match part {
            Part::Ready(event) => ready.push(event),
            Part::Deferred { events, .. } => {
                insert(conn, &std::mem::take(&mut ready)).await?;
                let mut events = events.peekable();
                while events.peek().is_some() {
                    let chunk: Vec<Event> = events.by_ref().take(DEFERRED_PER_STATEMENT).collect();
                    insert(conn, &chunk).await?;
                }
            }
        }
    }
    insert(conn, &ready).await
}

async fn insert(conn: &mut PgConnection, events: &[Event]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.envelope.id.0).collect();
    let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
    let payloads: Vec<serde_json::Value> =
        events.iter().map(|e| serde_json::to_value(&e.envelope).expect("envelopes always serialise")).collect();
    let created: Vec<OffsetDateTime> = events.iter().map(|e| e.envelope.occurred_at).collect();
    sqlx::query(
        "INSERT INTO ops.outbox (id, subject, payload, created_at)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::timestamptz[])",
    )
    .bind(&ids)
    .bind(&subjects)
    .bind(&payloads)
    .bind(&created)
    .execute(conn)
    .await?;
    Ok(())
}
