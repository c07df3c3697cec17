//! The token cache: for a few seconds (`TOKEN_CACHE_TTL`), who a bearer token authenticates,
//! so that a request whose token was checked a moment ago costs no token lookup.
//!
//! What may enter. Only a principal read on the primary, while the change listener below is
//! connected, and only if no eviction happened between the moment the lookup missed and the
//! moment the principal is put in (a global epoch): a revocation that committed after the read
//! and was notified before the insert then keeps the principal out, one notified after it
//! evicts it. A principal read on a read replica never enters: a replica may not have replayed
//! a revocation whose notification this process has already handled, and putting that read in
//! would keep the revoked token alive for the cache's TTL instead of the replica's lag bound.
//!
//! How long it stays. An entry is served until the earliest of: its TTL after the read was
//! sent, the token's `expires_at`, and its idle timeout counted from its last use as written
//! down (both as the database's clock said when the read was sent, so never later than the
//! database would stop authenticating it by its clocks). So the cache never extends a token's
//! expiry nor its idle timeout.
//!
//! What evicts. The database notifies channel [`CHANNEL`] (triggers of migration
//! `20261206000701_token_cache_notify`) when a token is revoked, deleted, or its expiry changes
//! (`t:<hash in hex>`) and when a user's status, role or password hash changes (`u:<user id>`:
//! every token of the user goes). A listener task ([`TokenCache::listen`]) applies them; a
//! revocation made by this process is also applied as soon as it commits. While the listener is
//! not connected (at start, and from a lost connection until a new one listens) the cache is
//! bypassed and empty, and it is emptied again on every new connection, so a notification
//! missed while disconnected cannot matter. A notification lost without the connection being
//! known lost (a silently broken connection) keeps a revoked token alive at most the TTL.
//!
//! Bound. At most `TOKEN_CACHE_ENTRIES` entries. Inserting into a full cache first drops the
//! entries past their time; if that frees less than half of it, everything goes (a cache of a
//! few seconds refills at once), so an insert costs O(1) amortized. A user's notification
//! scans the entries (there is no index by user to keep up): such changes are rare, and a scan
//! of the full default bound takes about a millisecond.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use trellis_domain::UserId;
use trellis_domain::identity::Role;
use uuid::Uuid;

use crate::instrument::{TokenCacheLookup, TokenCacheOutcome};

/// The channel of the database's token and user change notifications.
pub const CHANNEL: &str = "trellis_token_revoked";

/// A principal as the cache keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cached {
    pub user_id: UserId,
    pub role: Role,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    principal: Cached,
    until: Instant,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// The token authenticates this principal (without asking the database).
    Hit(Cached),
    /// Not cached: ask the database, then offer the answer with [`TokenCache::insert`].
    Miss(Ticket),
    /// The cache is off or not trusted now (its listener is not connected): ask the database.
    Bypassed,
}

/// The right to insert what a read begun now finds, if nothing is evicted meanwhile.
#[derive(Debug)]
pub struct Ticket {
    epoch: u64,
    sent: Instant,
}

/// What to evict once a write that revokes has committed.
#[derive(Debug, Clone, Copy)]
pub enum Evict {
    Token([u8; 32]),
    User(UserId),
}

struct Inner {
    entries: HashMap<[u8; 32], Entry>,
    /// Bumped by every eviction, clear, connection and disconnection.
    epoch: u64,
    /// Whether the listener is connected (and listening).
    trusted: bool,
}

pub struct TokenCache {
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Inner>,
}

impl TokenCache {
    /// A cache of `capacity` entries kept `ttl` at most; a zero TTL (or capacity) turns it off.
    /// It is not trusted until [`TokenCache::connected`].
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { ttl, capacity, inner: Mutex::new(Inner { entries: HashMap::new(), epoch: 0, trusted: false }) }
    }

    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.capacity > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Looks `token_hash` up; counts the outcome (nothing when the cache is off).
    pub fn lookup(&self, token_hash: &[u8; 32]) -> Lookup {
        if !self.enabled() {
            return Lookup::Bypassed;
        }
        let lookup = self.lookup_at(token_hash, Instant::now());
        let outcome = match lookup {
            Lookup::Hit(_) => TokenCacheOutcome::Hit,
            Lookup::Miss(_) => TokenCacheOutcome::Miss,
            Lookup::Bypassed => TokenCacheOutcome::Bypassed,
        };
        TokenCacheLookup { outcome }.emit();
        lookup
    }

    fn lookup_at(&self, token_hash: &[u8; 32], now: Instant) -> Lookup {
        let mut inner = self.lock();
        if !inner.trusted {
            return Lookup::Bypassed;
        }
        match inner.entries.get(token_hash) {
            Some(entry) if now < entry.until => Lookup::Hit(entry.principal),
            Some(_) => {
                inner.entries.remove(token_hash);
                Lookup::Miss(Ticket { epoch: inner.epoch, sent: now })
            }
            None => Lookup::Miss(Ticket { epoch: inner.epoch, sent: now }),
        }
    }

    /// Puts in what the primary answered to the read `ticket` was taken before: kept until the
    /// TTL or `live_for` (the token's own remaining life, as the read saw it) from the ticket,
    /// whichever comes first. Refused when anything was evicted since the ticket.
    pub fn insert(&self, ticket: Ticket, token_hash: [u8; 32], principal: Cached, live_for: Duration) {
        let until = ticket.sent + self.ttl.min(live_for);
        let mut inner = self.lock();
        if !inner.trusted || inner.epoch != ticket.epoch || until <= Instant::now() {
            return;
        }
        if inner.entries.len() >= self.capacity && !inner.entries.contains_key(&token_hash) {
            let now = Instant::now();
            inner.entries.retain(|_, e| now < e.until);
            // A sweep that frees less than half would be repeated too soon.
            if inner.entries.len() > self.capacity / 2 {
                inner.entries.clear();
            }
        }
        inner.entries.insert(token_hash, Entry { principal, until });
    }

    /// Forgets one token or every token of a user.
    pub fn evict(&self, evict: Evict) {
        let mut inner = self.lock();
        inner.epoch += 1;
        match evict {
            Evict::Token(hash) => {
                inner.entries.remove(&hash);
            }
            Evict::User(user) => inner.entries.retain(|_, e| e.principal.user_id != user),
        }
    }

    /// The listener listens: from now on every change is notified. Starts empty.
    pub fn connected(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.epoch += 1;
        inner.trusted = true;
    }

    /// The listener lost its connection: changes may go unnoticed, so nothing is served.
    pub fn disconnected(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.epoch += 1;
        inner.trusted = false;
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one notification's payload; an unknown payload empties the cache.
    fn apply(&self, payload: &str) {
        let evict = match payload.split_once(':') {
            Some(("t", hex)) => {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(hex, &mut hash).ok().map(|()| Evict::Token(hash))
            }
            Some(("u", id)) => id.parse::<Uuid>().ok().map(|id| Evict::User(UserId(id))),
            _ => None,
        };
        match evict {
            Some(evict) => self.evict(evict),
            None => {
                tracing::warn!(payload, "unknown token cache notification; emptying the cache");
                let mut inner = self.lock();
                inner.entries.clear();
                inner.epoch += 1;
            }
        }
    }

    /// Listens for the database's change notifications on a connection of `pool` (the
    /// primary's), until `stop`; reconnects with backoff when the connection is lost. The cache
    /// is trusted only while a connection listens.
    pub async fn listen(&self, pool: PgPool, stop: CancellationToken) {
        let mut delay = RECONNECT_MIN;
        loop {
            let listening = tokio::select! {
                _ = stop.cancelled() => return,
                l = listen_on(&pool) => l,
            };
            match listening {
                Ok(mut listener) => {
                    self.connected();
                    delay = RECONNECT_MIN;
                    tracing::debug!("token cache listening for revocations");
                    loop {
                        let got = tokio::select! {
                            _ = stop.cancelled() => {
                                self.disconnected();
                                return;
                            }
                            got = listener.try_recv() => got,
                        };
                        match got {
                            Ok(Some(notification)) => self.apply(notification.payload()),
                            Ok(None) => {
                                tracing::warn!(
                                    "token cache LISTEN connection lost; bypassing the cache until it is back"
                                );
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "token cache LISTEN failed; bypassing the cache until it is back");
                                break;
                            }
                        }
                    }
                    self.disconnected();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "token cache cannot LISTEN; the cache is bypassed meanwhile");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }
}

const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

async fn listen_on(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Cached = Cached { user_id: UserId(Uuid::from_u128(1)), role: Role::User };
    const BOB: Cached = Cached { user_id: UserId(Uuid::from_u128(2)), role: Role::Moderator };

    fn trusted(ttl: Duration, capacity: usize) -> TokenCache {
        let cache = TokenCache::new(ttl, capacity);
        cache.connected();
        cache
    }

    fn ticket(cache: &TokenCache, hash: [u8; 32]) -> Ticket {
        match cache.lookup(&hash) {
            Lookup::Miss(ticket) => ticket,
            other => panic!("expected a miss, got {other:?}"),
        }
    }

    #[test]
    fn an_entry_is_never_served_past_its_ttl_nor_its_token_s_own_life() {
        let cache = trusted(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        // The token itself expires (or idles out) 200 ms after the read: that bounds the entry.
        cache.insert(Ticket { epoch: 1, sent: t0 }, [1; 32], ALICE, Duration::from_millis(200));
        assert!(matches!(cache.lookup_at(&[1; 32], t0 + Duration::from_millis(199)), Lookup::Hit(p) if p == ALICE));
        assert!(matches!(cache.lookup_at(&[1; 32], t0 + Duration::from_millis(200)), Lookup::Miss(_)));
        assert!(cache.is_empty(), "a lookup past its time drops the entry");
        // A token with a long life: the TTL bounds it.
        let short = trusted(Duration::from_millis(100), 10);
        short.insert(Ticket { epoch: 1, sent: t0 }, [2; 32], BOB, Duration::from_secs(3600));
        assert!(matches!(short.lookup_at(&[2; 32], t0 + Duration::from_millis(99)), Lookup::Hit(p) if p == BOB));
        assert!(matches!(short.lookup_at(&[2; 32], t0 + Duration::from_millis(100)), Lookup::Miss(_)));
        // A token already past its life is not put in at all.
        cache.insert(Ticket { epoch: 1, sent: Instant::now() }, [3; 32], ALICE, Duration::ZERO);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_bound_holds_and_a_full_cache_drops_what_is_past_first() {
        let cache = trusted(Duration::from_secs(60), 4);
        let now = Instant::now();
        for i in 0..4u8 {
            // Two entries about to end, two for a minute.
            let life = if i < 2 { Duration::from_millis(1) } else { Duration::from_secs(60) };
            cache.insert(Ticket { epoch: 1, sent: now }, [i; 32], ALICE, life);
        }
        assert_eq!(cache.len(), 4);
        std::thread::sleep(Duration::from_millis(2));
        cache.insert(ticket(&cache, [9; 32]), [9; 32], BOB, Duration::from_secs(60));
        assert_eq!(cache.len(), 3, "the two past their time went, the new one is in");
        assert!(matches!(cache.lookup(&[2; 32]), Lookup::Hit(_)));
        // Full of live entries: everything goes, and the bound holds whatever is inserted.
        for i in 10..200u8 {
            cache.insert(ticket(&cache, [i; 32]), [i; 32], ALICE, Duration::from_secs(60));
            assert!(cache.len() <= 4, "{} entries", cache.len());
        }
    }

    #[test]
    fn evictions_and_lost_connections_keep_reads_begun_before_them_out() {
        let cache = trusted(Duration::from_secs(60), 10);
        let ticket_a = ticket(&cache, [1; 32]);
        cache.evict(Evict::Token([7; 32]));
        cache.insert(ticket_a, [1; 32], ALICE, Duration::from_secs(60));
        assert!(cache.is_empty(), "a read begun before an eviction may have missed its revocation");

        cache.insert(ticket(&cache, [1; 32]), [1; 32], ALICE, Duration::from_secs(60));
        cache.insert(ticket(&cache, [2; 32]), [2; 32], ALICE, Duration::from_secs(60));
        cache.insert(ticket(&cache, [3; 32]), [3; 32], BOB, Duration::from_secs(60));
        cache.apply(&format!("u:{}", ALICE.user_id.0));
        assert_eq!(cache.len(), 1, "every token of the user goes");
        cache.apply(&format!("t:{}", hex::encode([3u8; 32])));
        assert!(cache.is_empty());

        cache.insert(ticket(&cache, [1; 32]), [1; 32], ALICE, Duration::from_secs(60));
        let before = ticket(&cache, [2; 32]);
        cache.disconnected();
        assert!(cache.is_empty());
        assert!(matches!(cache.lookup(&[1; 32]), Lookup::Bypassed));
        cache.connected();
        cache.insert(before, [2; 32], ALICE, Duration::from_secs(60));
        assert!(cache.is_empty(), "a read begun before a reconnection stays out");

        let off = TokenCache::new(Duration::ZERO, 10);
        off.connected();
        assert!(matches!(off.lookup(&[1; 32]), Lookup::Bypassed));
    }
}
