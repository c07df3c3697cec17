//! One asynchronous mutex per key, made on first use and dropped with its last holder or waiter.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// Serialises work per key inside this process. A request that waits here holds no database
/// connection: many concurrent requests for one key (one reporter's filings, say) cannot take
/// the pool from everyone else while they queue for a lock the database would also make them
/// wait for.
pub struct KeyedMutex<K> {
    locks: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while the key's work runs; the key's entry goes when nobody holds or awaits it.
pub struct KeyedGuard<'a, K: Eq + Hash + Clone> {
    owner: &'a KeyedMutex<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> Default for KeyedMutex<K> {
    fn default() -> Self {
        Self { locks: Mutex::default() }
    }
}

impl<K: Eq + Hash + Clone> KeyedMutex<K> {
    pub async fn lock(&self, key: K) -> KeyedGuard<'_, K> {
        let lock = self.locks.lock().expect("keyed mutex map lock").entry(key.clone()).or_default().clone();
        // Whether this wait completes or is cancelled, the guard's drop cleans up after it.
        let mut held = KeyedGuard { owner: self, key, guard: None };
        held.guard = Some(lock.lock_owned().await);
        held
    }

    /// Keys with a holder or a waiter.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().expect("keyed mutex map lock").len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash + Clone> Drop for KeyedGuard<'_, K> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.owner.locks.lock().expect("keyed mutex map lock");
        // Only the map's own reference is left: no holder, no waiter.
        if locks.get(&self.key).is_some_and(|lock| Arc::strong_count(lock) == 1) {
            locks.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_key_is_held_by_one_at_a_time_and_its_entry_goes_with_the_last() {
        let locks = Arc::new(KeyedMutex::<u32>::default());
        let first = locks.lock(1).await;
        let other_key = locks.lock(2).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock(1).await;
            })
        };
        // The waiter cannot finish while the first holds key 1.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), async {
                while !waiter.is_finished() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_err()
        );
        drop(first);
        waiter.await.unwrap();
        assert_eq!(locks.len(), 1, "key 1 is gone, key 2 is held");
        drop(other_key);
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_no_entry_behind() {
        let locks = KeyedMutex::<u32>::default();
        let held = locks.lock(7).await;
        assert!(tokio::time::timeout(Duration::from_millis(10), locks.lock(7)).await.is_err());
        drop(held);
        assert!(locks.is_empty());
    }
}
