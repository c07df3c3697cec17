//! Writing `ops.outbox` rows: private to this crate, so that [`crate::commit_with`] is the only
//! way to write one.

use opentelemetry::trace::TraceContextExt as _;
use sqlx::PgConnection;
use time::OffsetDateTime;
use tracing::Instrument as _;
use trellis_domain::events::Event;
use uuid::Uuid;

use crate::Part;

/// Events per statement of a deferred run: a score run's chunks are about 50 KB each.
const DEFERRED_PER_STATEMENT: usize = 20;

/// Writes every event of `parts`, in order, to `ops.outbox` on the caller's transaction, each
/// with the trace context of an `outbox write` span, a child of the current span (the HTTP
/// request's, or a worker's process span).
pub(crate) async fn write(conn: &mut PgConnection, parts: Vec<Part>) -> Result<(), sqlx::Error> {
    if parts.is_empty() {
        return Ok(());
    }
    let span = tracing::info_span!("outbox write", otel.kind = "internal", db.system.name = "postgresql");
    write_traced(conn, parts).instrument(span).await
}

async fn write_traced(conn: &mut PgConnection, parts: Vec<Part>) -> Result<(), sqlx::Error> {
    let trace = Trace::current();
    let mut ready = Vec::new();
    for part in parts {
        match part {
            Part::Ready(event) => ready.push(event),
            Part::Deferred { events, .. } => {
                insert(conn, &std::mem::take(&mut ready), &trace).await?;
                let mut events = events.peekable();
                while events.peek().is_some() {
                    let chunk: Vec<Event> = events.by_ref().take(DEFERRED_PER_STATEMENT).collect();
                    insert(conn, &chunk, &trace).await?;
                }
            }
        }
    }
    insert(conn, &ready, &trace).await
}

/// The W3C trace context of the current span, as stored on an outbox row.
struct Trace {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Trace {
    fn current() -> Self {
        let cx = tracing_opentelemetry::OpenTelemetrySpanExt::context(&tracing::Span::current());
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return Self { traceparent: None, tracestate: None };
        }
        let traceparent = format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8());
        let state = sc.trace_state().header();
        Self { traceparent: Some(traceparent), tracestate: (!state.is_empty()).then_some(state) }
    }
}

async fn insert(conn: &mut PgConnection, events: &[Event], trace: &Trace) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.envelope.id.0).collect();
    let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
    let payloads: Vec<serde_json::Value> =
        events.iter().map(|e| serde_json::to_value(&e.envelope).expect("envelopes always serialise")).collect();
    let created: Vec<OffsetDateTime> = events.iter().map(|e| e.envelope.occurred_at).collect();
    sqlx::query(
        "INSERT INTO ops.outbox (id, subject, payload, created_at, traceparent, tracestate)
         SELECT *, $5::text, $6::text FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::timestamptz[])",
    )
    .bind(&ids)
    .bind(&subjects)
    .bind(&payloads)
    .bind(&created)
    .bind(&trace.traceparent)
    .bind(&trace.tracestate)
    .execute(conn)
    .await?;
    Ok(())
}
