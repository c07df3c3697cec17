//! Daily active users, computed cheaply: requests only remember (in memory) which bearer
//! tokens they carried; once per flush interval the set is written to
//! `identity.user_activity` in one statement (at most one row write per user per hour), and the
//! gauge `trellis_api_daily_active_users` is set from an index range count of the last 24 h.
//! Every API replica exports the same database-wide value (aggregate with `max`).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Distinct tokens remembered between two flushes. Past it, further new tokens of the same
/// interval are not remembered: that many distinct callers a minute is far past every
/// daily-active-users threshold, so the gauge still crosses them.
const CAPACITY: usize = 100_000;

#[derive(Default)]
pub struct ActivityTracker {
    seen: Mutex<HashSet<[u8; 32]>>,
}

impl ActivityTracker {
    pub fn saw(&self, token_hash: [u8; 32]) {
        let mut seen = self.seen.lock().expect("activity lock");
        if seen.len() < CAPACITY {
            seen.insert(token_hash);
        }
    }

    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.seen.lock().expect("activity lock")).into_iter().map(|h| h.to_vec()).collect()
    }

    /// Writes what was seen and refreshes the gauge, every `interval` until `cancel`, then
    /// writes once more so that a graceful stop loses nothing.
    pub async fn run(&self, pool: PgPool, interval: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => {
                    self.flush(&pool).await;
                    return;
                }
            }
            self.flush(&pool).await;
            match trellis_store::activity::daily_active_users(&pool).await {
                Ok(n) => metrics::gauge!("trellis_api_daily_active_users").set(n as f64),
                Err(e) => tracing::warn!(error = %e, "counting daily active users failed"),
            }
        }
    }

    async fn flush(&self, pool: &PgPool) {
        let hashes = self.take();
        if hashes.is_empty() {
            return;
        }
        if let Err(e) = trellis_store::activity::record_by_token_hashes(pool, &hashes).await {
            tracing::warn!(error = %e, tokens = hashes.len(), "recording user activity failed; keeping it for the next flush");
            let mut seen = self.seen.lock().expect("activity lock");
            for hash in hashes {
                if seen.len() >= CAPACITY {
                    break;
                }
                if let Ok(hash) = <[u8; 32]>::try_from(hash) {
                    seen.insert(hash);
                }
            }
        }
    }
}
