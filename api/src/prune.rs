//! Pruning: expired idempotency keys and dead bearer tokens (revoked, expired, or idle past
//! `TOKEN_IDLE_TIMEOUT`) are deleted every `PRUNE_INTERVAL`, in batches, until none is left;
//! and the `trellis_api_idempotency_keys` gauge (the table's live rows) is refreshed. Every replica
//! prunes; deleting what another replica deletes at the same time is harmless.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement: each batch is a short transaction of its own.
const BATCH: i64 = 10_000;

pub async fn run(pool: PgPool, interval: Duration, token_idle_timeout: Duration, cancel: CancellationToken) {
    refresh_gauge(&pool).await;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        until_done("idempotency keys", &cancel, || trellis_store::idempotency::prune_expired(&pool, BATCH)).await;
        until_done("tokens", &cancel, || trellis_store::identity::prune_tokens(&pool, token_idle_timeout, BATCH)).await;
        refresh_gauge(&pool).await;
    }
}

/// Runs `batch` until it deletes less than a full batch (the backlog is gone), fails, or the
/// process stops.
async fn until_done<F, Fut>(what: &str, cancel: &CancellationToken, mut batch: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, sqlx::Error>>,
{
    let mut deleted = 0;
    while !cancel.is_cancelled() {
        match batch().await {
            Ok(n) => {
                deleted += n;
                if n < BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, deleted, "pruning {what} failed; the rest waits for the next interval");
                return;
            }
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, "pruned {what}");
    }
}

async fn refresh_gauge(pool: &PgPool) {
    match trellis_store::idempotency::stored_keys(pool).await {
        Ok(keys) => crate::instrument::IdempotencyKeysCounted { keys }.emit(),
        Err(e) => tracing::warn!(error = %e, "counting idempotency keys failed"),
    }
}
