//! Token use and daily active users, computed cheaply: a request that authenticated remembers
//! (in memory) the token it carried; a token that does not authenticate is never remembered, so
//! no anonymous caller can fill the set. Once per flush interval the set is written in one
//! statement: each token's `last_used_at` (its idle timeout counts from it; at most one write
//! per token per minute) and `identity.user_activity` (at most one row write per user per
//! hour). The gauge `trellis_api_daily_active_users` is set from an index range count of the
//! last 24 h; every API replica exports the same database-wide value (aggregate with `max`).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Authenticated tokens seen since the last flush, up to `capacity` (`ACTIVITY_MAX_TOKENS`).
/// Past it, further new tokens of the same interval are not remembered: that many distinct
/// signed-in callers a minute is far past every daily-active-users threshold, so the gauge still
/// crosses them, and a token left out keeps its last use of a minute earlier.
pub struct ActivityTracker {
    seen: Mutex<HashSet<[u8; 32]>>,
    capacity: usize,
}

impl ActivityTracker {
    pub fn new(capacity: usize) -> Self {
        Self { seen: Mutex::default(), capacity }
    }

    /// Remembers a token that authenticated a request.
    pub fn saw(&self, token_hash: [u8; 32]) {
        let mut seen = self.seen.lock().expect("activity lock");
        if seen.len() < self.capacity {
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
                Ok(users) => crate::instrument::DailyActiveUsersCounted { users }.emit(),
                Err(e) => tracing::warn!(error = %e, "counting daily active users failed"),
            }
        }
    }

    async fn flush(&self, pool: &PgPool) {
        let hashes = self.take();
        if hashes.is_empty() {
            return;
        }
        if let Err(e) = trellis_store::activity::record_token_use(pool, &hashes).await {
            tracing::warn!(error = %e, tokens = hashes.len(), "recording user activity failed; keeping it for the next flush");
            let mut seen = self.seen.lock().expect("activity lock");
            for hash in hashes {
                if seen.len() >= self.capacity {
                    break;
                }
                if let Ok(hash) = <[u8; 32]>::try_from(hash) {
                    seen.insert(hash);
                }
            }
        }
    }
}
