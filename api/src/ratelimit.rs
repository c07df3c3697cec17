//! Rate limits (GCRA, in memory per replica): login per client address and per account,
//! registration per client address and globally, current-password checks per user.
//!
//! Every keyed limiter keeps its keys in a [`BoundedStore`]: at most `RATE_LIMITER_CAPACITY`
//! keys, the key closest to a fresh allowance forgotten first when a new one arrives, and the
//! fully recovered keys forgotten every `RATE_LIMITER_PRUNE_INTERVAL`. Keys are fixed-size (an
//! address, a user id, or a 128-bit hash of a login name), so a limiter's memory is bounded by
//! its capacity whatever clients send. `trellis_api_rate_limiter_keys{limiter}` is each one's
//! key count.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{RateLimiter, StateStore};
use governor::{DefaultDirectRateLimiter, Quota};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client_address::ClientAddress;
use crate::config::Config;
use crate::instrument::RateLimiterResized;

/// The values of `trellis_api_rate_limiter_keys{limiter}`.
pub const LIMITERS: [&str; 4] = ["login_address", "login_account", "registration_address", "current_password"];

/// A keyed state store of at most `capacity` keys. Each key's state is its GCRA theoretical
/// arrival time (TAT); a key whose TAT is in the past is indistinguishable from a new one.
/// When full, a new key replaces the key with the earliest TAT: the one that has used least
/// of its allowance, so that keys under active limiting are the last to go.
pub struct BoundedStore<K> {
    capacity: usize,
    inner: Mutex<Tats<K>>,
}

struct Tats<K> {
    by_key: HashMap<K, u64>,
    by_tat: BTreeSet<(u64, K)>,
}

impl<K: Hash + Eq + Ord + Clone> BoundedStore<K> {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), inner: Mutex::new(Tats { by_key: HashMap::new(), by_tat: BTreeSet::new() }) }
    }
}

impl<K: Hash + Eq + Ord + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut tats = self.inner.lock().expect("rate limiter lock");
        let previous = tats.by_key.get(key).copied();
        // A refused attempt changes nothing, and in particular inserts no key.
        let (outcome, tat) = f(previous.map(Nanos::new))?;
        let tat = tat.as_u64();
        match previous {
            Some(old) => {
                tats.by_tat.remove(&(old, key.clone()));
            }
            None => {
                if tats.by_key.len() >= self.capacity
                    && let Some((_, evicted)) = tats.by_tat.pop_first()
                {
                    tats.by_key.remove(&evicted);
                }
            }
        }
        tats.by_key.insert(key.clone(), tat);
        tats.by_tat.insert((tat, key.clone()));
        Ok(outcome)
    }
}

impl<K: Hash + Eq + Ord + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut tats = self.inner.lock().expect("rate limiter lock");
        let drop_below = drop_below.as_u64();
        while let Some((tat, _)) = tats.by_tat.first()
            && *tat <= drop_below
        {
            let (_, key) = tats.by_tat.pop_first().expect("just looked at it");
            tats.by_key.remove(&key);
        }
    }

    fn shrink_to_fit(&self) {
        self.inner.lock().expect("rate limiter lock").by_key.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.inner.lock().expect("rate limiter lock").by_key.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One keyed limit: a GCRA limiter over a [`BoundedStore`], named for its metric.
pub struct KeyedLimiter<K: Hash + Eq + Ord + Clone> {
    name: &'static str,
    limiter: RateLimiter<K, BoundedStore<K>, DefaultClock>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Ord + Clone> KeyedLimiter<K> {
    pub fn new(name: &'static str, quota: Quota, capacity: usize) -> Self {
        let clock = DefaultClock::default();
        Self { name, limiter: RateLimiter::new(quota, BoundedStore::new(capacity), clock.clone()), clock }
    }

    /// `Err(seconds to wait)` when `key` has no allowance left; an allowed attempt uses one.
    pub fn check(&self, key: &K) -> Result<(), u64> {
        let outcome = self.limiter.check_key(key);
        self.publish();
        outcome.map_err(|not_until| wait_secs(not_until.wait_time_from(self.clock.now())))
    }

    /// Forgets the keys whose allowance has fully recovered.
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.publish();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    fn publish(&self) {
        RateLimiterResized { limiter: self.name, keys: self.limiter.len() }.emit();
    }
}

fn wait_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).expect("at least one"))
}

fn per_hour(n: u32) -> Quota {
    Quota::per_hour(NonZeroU32::new(n.max(1)).expect("at least one"))
}

/// Whose allowance a login attempt uses: the user's once the login names one (so that a
/// user's handle and e-mail share one), otherwise the login name's, as a 128-bit hash of its
/// canonical form (a key of fixed size whatever was sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccountKey {
    User(Uuid),
    Login([u8; 16]),
}

impl AccountKey {
    /// The key of a canonical login (`trellis_domain::identity::canonical_login`) that names
    /// no user.
    pub fn login(canonical: &str) -> Self {
        let digest = Sha256::digest(canonical.as_bytes());
        Self::Login(digest[..16].try_into().expect("SHA-256 has 32 bytes"))
    }
}

/// Every rate limit of the API.
pub struct Limiters {
    /// Login attempts per client address, checked first.
    pub login_address: KeyedLimiter<ClientAddress>,
    /// Login attempts per account, checked once the address allowed the attempt.
    pub login_account: KeyedLimiter<AccountKey>,
    /// Registrations per client address.
    pub registration_address: KeyedLimiter<ClientAddress>,
    /// Registrations from everyone together.
    pub registration_global: DefaultDirectRateLimiter,
    /// Current-password checks per user.
    pub current_password: KeyedLimiter<Uuid>,
    clock: DefaultClock,
}

impl Limiters {
    pub fn new(config: &Config) -> Self {
        let capacity = config.rate_limiter_capacity;
        let limiters = Self {
            login_address: KeyedLimiter::new("login_address", per_minute(config.login_rate_per_address), capacity),
            login_account: KeyedLimiter::new("login_account", per_minute(config.login_rate_per_account), capacity),
            registration_address: KeyedLimiter::new(
                "registration_address",
                per_hour(config.registration_rate_per_address),
                capacity,
            ),
            registration_global: DefaultDirectRateLimiter::direct(per_minute(config.registration_rate_global)),
            current_password: KeyedLimiter::new(
                "current_password",
                per_hour(config.current_password_rate_per_user),
                capacity,
            ),
            clock: DefaultClock::default(),
        };
        limiters.retain_recent();
        limiters
    }

    /// A registration from `address`: `Err(seconds to wait)` when its address or everyone
    /// together has no allowance left. The global allowance is only used by attempts the
    /// address allowed.
    pub fn check_registration(&self, address: ClientAddress) -> Result<(), u64> {
        self.registration_address.check(&address)?;
        self.registration_global.check().map_err(|not_until| wait_secs(not_until.wait_time_from(self.clock.now())))
    }

    pub fn retain_recent(&self) {
        self.login_address.retain_recent();
        self.login_account.retain_recent();
        self.registration_address.retain_recent();
        self.current_password.retain_recent();
    }

    /// Forgets recovered keys every `interval` until `cancel`.
    pub async fn prune(&self, interval: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.retain_recent(),
                _ = cancel.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(ip: &str) -> ClientAddress {
        ClientAddress::of(ip.parse().unwrap())
    }

    #[test]
    fn the_eleventh_attempt_in_a_minute_is_refused() {
        let limiter = KeyedLimiter::new("login_account", per_minute(10), 100);
        let alice = AccountKey::login("alice");
        for _ in 0..10 {
            assert!(limiter.check(&alice).is_ok());
        }
        let wait = limiter.check(&alice).unwrap_err();
        assert!((1..=6).contains(&wait), "waits {wait}s");
        assert!(limiter.check(&AccountKey::login("bob")).is_ok(), "another login is not limited");
    }

    #[test]
    fn a_refused_attempt_inserts_no_key() {
        let limiter = KeyedLimiter::new("login_address", per_minute(1), 100);
        let ip = address("10.0.0.1");
        assert!(limiter.check(&ip).is_ok());
        assert!(limiter.check(&ip).is_err());
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn the_store_never_holds_more_than_its_capacity() {
        let limiter = KeyedLimiter::new("login_account", per_minute(10), 100);
        for i in 0..10_000u32 {
            let _ = limiter.check(&AccountKey::login(&format!("login-{i}")));
            assert!(limiter.len() <= 100);
        }
        assert_eq!(limiter.len(), 100);
    }

    #[test]
    fn a_flood_of_new_keys_does_not_push_out_a_key_being_limited() {
        let limiter = KeyedLimiter::new("login_account", per_minute(10), 50);
        let victim = AccountKey::User(Uuid::nil());
        while limiter.check(&victim).is_ok() {}
        for i in 0..5_000u32 {
            let _ = limiter.check(&AccountKey::login(&format!("attacker-{i}")));
        }
        assert!(limiter.check(&victim).is_err(), "the victim's exhausted allowance was forgotten");
    }

    #[test]
    fn recovered_keys_are_pruned() {
        // 60 per minute: one attempt is fully recovered after a second.
        let limiter = KeyedLimiter::new("login_address", per_minute(60_000), 100);
        for i in 0..10u8 {
            limiter.check(&address(&format!("10.0.0.{i}"))).unwrap();
        }
        assert_eq!(limiter.len(), 10);
        std::thread::sleep(Duration::from_millis(5));
        limiter.retain_recent();
        assert!(limiter.is_empty(), "{} keys left", limiter.len());
    }
}
