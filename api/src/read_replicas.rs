//! Read replicas: the lag-tolerant reads (search, profiles, scores, contact and circle lists) on
//! PostgreSQL streaming replicas (`DATABASE_READ_URL`), with read-your-writes for the writer.
//!
//! Positions in the write-ahead log ([`Lsn`]) say what a replica has. A background task
//! ([`ReadReplicas::poll`]) reads, every `DATABASE_READ_POLL_INTERVAL`, the primary's WAL
//! position and each replica's replayed position, and from them each replica's lag in bytes and
//! in seconds (how long ago the primary was first seen at a position the replica has not
//! replayed yet). A replica serves reads only while its lag, as last measured plus the time
//! since, is within `DATABASE_READ_MAX_LAG`; one that cannot be polled serves none.
//!
//! Read-your-writes. Every successful write answers with `Trellis-Commit-LSN`, a WAL position
//! at or past its commit record (the primary's insert position read after the commit), and the
//! API remembers it for the request's bearer token (a bounded record, [`SessionLsns`]). A
//! lag-tolerant read requires the highest of that record and the `Trellis-Commit-LSN` the
//! request sends back (for a client whose writes went to another API process); a replica
//! serves it only if it has replayed that position, otherwise the primary does.
//!
//! Authentication. A read routed to a replica authenticates its bearer token there, so a token
//! revoked on the primary still authenticates on a replica until the replica replays the
//! revocation: at most `DATABASE_READ_MAX_LAG` later (a revocation made with the token itself,
//! by its own session on this process, is seen at once: its commit position is required). A
//! token a replica does not know is checked on the primary before the answer is a 401, so a
//! token just issued works at once. A token in the token cache is not looked up at all; what a
//! replica authenticates never enters it (`crate::token_cache`), so the cache adds nothing to
//! this window.
//!
//! Without `DATABASE_READ_URL` none of this runs: no poller, no record, no header, no query.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use trellis_runtime::config::SecretUrl;
use trellis_store::PoolConfig;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::instrument::{ReadFellBack, ReadServed, ReplicaFallbackReason, ReplicaPolled};

/// The header of a write's commit position (in its answer) and of the position a read must see
/// (in a request).
pub const COMMIT_LSN_HEADER: &str = "trellis-commit-lsn";

/// A position in PostgreSQL's write-ahead log, written as PostgreSQL does: two hexadecimal
/// numbers of 1 to 8 digits, `high/low` (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The position in `text`, strictly: no sign, no space, no prefix, at most 8 digits a side.
    pub fn parse(text: &str) -> Option<Lsn> {
        let (high, low) = text.split_once('/')?;
        let half = |s: &str| {
            let valid = (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
            valid.then(|| u32::from_str_radix(s, 16).ok()).flatten()
        };
        Some(Lsn((u64::from(half(high)?) << 32) | u64::from(half(low)?)))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The position a request requires of a replica: its `Trellis-Commit-LSN`, if any. A header
/// that is not one position is a 400.
pub fn requested_lsn(headers: &HeaderMap) -> Result<Option<Lsn>, ApiError> {
    let mut values = headers.get_all(COMMIT_LSN_HEADER).iter();
    let Some(value) = values.next() else { return Ok(None) };
    let invalid = || {
        ApiError::bad_request(
            "invalid-commit-lsn",
            "Trellis-Commit-LSN must be one WAL position as a write answered it, such as 16/B374D848",
        )
    };
    if values.next().is_some() {
        return Err(invalid());
    }
    value.to_str().ok().and_then(Lsn::parse).map(Some).ok_or_else(invalid)
}

/// One replica of `DATABASE_READ_URL`: its URL and the name it has in metrics and logs.
#[derive(Debug, Clone)]
pub struct ReplicaUrl {
    /// `host:port`: no credentials.
    pub name: String,
    pub url: SecretUrl,
}

/// The replicas of `DATABASE_READ_URL`: comma-separated `postgres://` URLs; empty, none.
/// Errors name the URL redacted.
pub fn parse_urls(list: &str) -> Result<Vec<ReplicaUrl>, String> {
    let mut replicas: Vec<ReplicaUrl> = Vec::new();
    for (i, url) in list.split(',').map(str::trim).enumerate() {
        if url.is_empty() {
            if list.trim().is_empty() {
                break;
            }
            return Err(format!("DATABASE_READ_URL: URL {} of the list is empty", i + 1));
        }
        let shown = trellis_runtime::config::redact_url(url);
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!("DATABASE_READ_URL: {shown} is not a postgres:// URL"));
        }
        let options: PgConnectOptions =
            url.parse().map_err(|e| format!("DATABASE_READ_URL: {shown} is not a valid URL: {e}"))?;
        let name = format!("{}:{}", options.get_host(), options.get_port());
        if replicas.iter().any(|r| r.name == name) {
            return Err(format!("DATABASE_READ_URL: {name} is listed twice"));
        }
        replicas.push(ReplicaUrl { name, url: SecretUrl::new(url) });
    }
    Ok(replicas)
}

/// The read replicas' settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub replicas: Vec<ReplicaUrl>,
    pub poll_interval: Duration,
    pub max_lag: Duration,
    /// Bearer tokens whose last commit position is remembered at most.
    pub sessions: usize,
}

impl Settings {
    /// Settings that are each valid but do not fit together.
    pub fn check(&self) -> Result<(), String> {
        if self.poll_interval.is_zero() {
            return Err("DATABASE_READ_POLL_INTERVAL must be more than 0".into());
        }
        if self.max_lag <= self.poll_interval {
            return Err(format!(
                "DATABASE_READ_MAX_LAG ({}) must exceed DATABASE_READ_POLL_INTERVAL ({}): a replica's lag is only \
                 known once a poll",
                humantime::format_duration(self.max_lag),
                humantime::format_duration(self.poll_interval)
            ));
        }
        if self.sessions == 0 {
            return Err("DATABASE_READ_SESSIONS must be at least 1".into());
        }
        Ok(())
    }
}

/// One replica: its pool and what the last poll found.
struct Replica {
    /// Leaked once at start-up: a label of every read it serves.
    name: &'static str,
    pool: PgPool,
    /// The position it had replayed at the last poll that reached it.
    replayed: AtomicU64,
    /// Until when (milliseconds since [`ReadReplicas::epoch`]) it may serve reads: the last
    /// poll's time plus what its lag then left of the bound. 0: not at all.
    usable_until_ms: AtomicU64,
    /// Whether the last poll reached it (and it is a standby).
    reached: AtomicBool,
}

/// The read replicas of this process: the choice of the database of each lag-tolerant read.
pub struct ReadReplicas {
    primary: PgPool,
    replicas: Vec<Replica>,
    sessions: SessionLsns,
    poll_interval: Duration,
    max_lag: Duration,
    epoch: Instant,
    /// Spreads reads over the replicas that qualify.
    turn: AtomicUsize,
}

/// Where a read runs.
#[derive(Clone)]
pub struct Choice {
    pub pool: PgPool,
    /// The replica's index; `None` for the primary.
    replica: Option<usize>,
}

impl ReadReplicas {
    /// Pools (lazy: nothing connects before the first poll) for each replica.
    pub fn new(primary: PgPool, settings: &Settings, pool_config: &PoolConfig) -> anyhow::Result<Self> {
        let mut replicas = Vec::with_capacity(settings.replicas.len());
        for replica in &settings.replicas {
            let pool = trellis_store::connect_lazy(replica.url.expose(), pool_config)
                .map_err(|e| anyhow::anyhow!("DATABASE_READ_URL {}: {e}", replica.url))?;
            replicas.push(Replica {
                name: Box::leak(replica.name.clone().into_boxed_str()),
                pool,
                replayed: AtomicU64::new(0),
                usable_until_ms: AtomicU64::new(0),
                reached: AtomicBool::new(false),
            });
        }
        Ok(Self {
            primary,
            replicas,
            sessions: SessionLsns::new(settings.sessions),
            poll_interval: settings.poll_interval,
            max_lag: settings.max_lag,
            epoch: Instant::now(),
            turn: AtomicUsize::new(0),
        })
    }

    /// The replicas' names, for the metrics registered at start-up.
    pub fn names(&self) -> Vec<&'static str> {
        self.replicas.iter().map(|r| r.name).collect()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The database of a read that must see `required`: a replica within the lag bound that has
    /// replayed it, in turn, or the primary (and why).
    pub fn choose(&self, required: Lsn) -> Choice {
        let now = self.now_ms();
        let mut within_lag = 0;
        let mut any_reached = false;
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut found = None;
        for offset in 0..self.replicas.len() {
            let i = (start + offset) % self.replicas.len();
            let replica = &self.replicas[i];
            any_reached |= replica.reached.load(Ordering::Acquire);
            if replica.usable_until_ms.load(Ordering::Acquire) <= now {
                continue;
            }
            within_lag += 1;
            if Lsn(replica.replayed.load(Ordering::Acquire)) >= required {
                found = Some(i);
                break;
            }
        }
        match found {
            Some(i) => {
                ReadServed { target: self.replicas[i].name }.emit();
                Choice { pool: self.replicas[i].pool.clone(), replica: Some(i) }
            }
            None => {
                let reason = if within_lag > 0 {
                    ReplicaFallbackReason::OwnWrite
                } else if any_reached {
                    ReplicaFallbackReason::Lagging
                } else {
                    ReplicaFallbackReason::Unreachable
                };
                ReadFellBack { reason }.emit();
                self.primary_choice()
            }
        }
    }

    fn primary_choice(&self) -> Choice {
        ReadServed { target: PRIMARY }.emit();
        Choice { pool: self.primary.clone(), replica: None }
    }

    /// The position a request must see: what it sent, and what its bearer token last wrote here.
    pub fn required(&self, headers: &HeaderMap, sent: Option<Lsn>) -> Lsn {
        let session = crate::auth::bearer_from_headers(headers).map(crate::auth::hash_token);
        let recorded = session.map_or(self.sessions.floor(), |hash| self.sessions.get(&hash));
        sent.unwrap_or_default().max(recorded)
    }

    /// After a successful write: the primary's insert position now, which is at or past the end
    /// of every commit that finished before, remembered for the request's bearer token if the
    /// write authenticated it (`authenticated`). `None` (logged) when it cannot be read: the
    /// write stands, its answer has no position.
    pub async fn written(&self, headers: &HeaderMap, authenticated: bool) -> Option<Lsn> {
        let read =
            sqlx::query_scalar::<_, String>("SELECT pg_current_wal_insert_lsn()::text").fetch_one(&self.primary).await;
        let lsn = match read.as_deref().map(Lsn::parse) {
            Ok(Some(lsn)) => lsn,
            Ok(None) => {
                tracing::warn!(?read, "the primary's insert position is not an LSN");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the commit position of a write: its answer has none");
                return None;
            }
        };
        if let Some(token) = crate::auth::bearer_from_headers(headers).filter(|_| authenticated) {
            let min_replayed = self.min_replayed();
            self.sessions.record(crate::auth::hash_token(token), lsn, min_replayed);
        }
        Some(lsn)
    }

    /// The lowest position every replica has replayed: a recorded position at or below it
    /// constrains no read any more.
    fn min_replayed(&self) -> Lsn {
        Lsn(self.replicas.iter().map(|r| r.replayed.load(Ordering::Acquire)).min().unwrap_or(0))
    }

    /// Polls the primary and every replica until `stop`: the replicas' positions, lags and
    /// whether they may serve.
    pub async fn poll(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let mut samples = LagSamples::default();
        let mut tick = tokio::time::interval(self.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_usable = vec![false; self.replicas.len()];
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            self.poll_once(&mut samples, &mut was_usable).await;
        }
    }

    async fn poll_once(&self, samples: &mut LagSamples, was_usable: &mut [bool]) {
        let timeout = self.max_lag;
        let at = Instant::now();
        let at_ms = self.now_ms();
        let primary = tokio::time::timeout(
            timeout,
            sqlx::query_scalar::<_, String>("SELECT pg_current_wal_lsn()::text").fetch_one(&self.primary),
        )
        .await;
        let primary = match primary {
            Ok(Ok(text)) => Lsn::parse(&text),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "read replicas: cannot read the primary's WAL position");
                None
            }
            Err(_) => None,
        };
        let Some(primary) = primary else {
            // No lag can be measured: the replicas serve until what their last poll allowed.
            return;
        };
        samples.push(at, primary);
        let polls = self.replicas.iter().map(|replica| {
            tokio::time::timeout(
                timeout,
                sqlx::query_scalar::<_, Option<String>>("SELECT pg_last_wal_replay_lsn()::text")
                    .fetch_one(&replica.pool),
            )
        });
        let results = futures::future::join_all(polls).await;
        for (i, (replica, result)) in self.replicas.iter().zip(results).enumerate() {
            let replayed = match result {
                Ok(Ok(Some(text))) => Lsn::parse(&text),
                Ok(Ok(None)) => {
                    if was_usable[i] || !replica.reached.load(Ordering::Acquire) {
                        tracing::warn!(replica = %replica.name, "read replica is not a standby (pg_last_wal_replay_lsn() is null): not used");
                    }
                    None
                }
                Ok(Err(e)) => {
                    if was_usable[i] {
                        tracing::warn!(replica = %replica.name, error = %e, "read replica cannot be polled: not used");
                    }
                    None
                }
                Err(_) => {
                    if was_usable[i] {
                        tracing::warn!(replica = %replica.name, "read replica did not answer its poll in time: not used");
                    }
                    None
                }
            };
            let Some(replayed) = replayed else {
                replica.reached.store(false, Ordering::Release);
                replica.usable_until_ms.store(0, Ordering::Release);
                was_usable[i] = false;
                continue;
            };
            // What it has now, even if lower than before (a replica rebuilt behind the same URL).
            replica.replayed.store(replayed.0, Ordering::Release);
            replica.reached.store(true, Ordering::Release);
            let (lag, known) = samples.lag(replayed, at);
            let lag_bytes = primary.0.saturating_sub(replayed.0);
            let usable = known && lag < self.max_lag;
            let until = if usable { at_ms + (self.max_lag - lag).as_millis() as u64 } else { 0 };
            replica.usable_until_ms.store(until, Ordering::Release);
            if usable != was_usable[i] {
                tracing::info!(replica = %replica.name, usable, lag_seconds = lag.as_secs_f64(), lag_bytes, "read replica usable changed");
                was_usable[i] = usable;
            }
            ReplicaPolled { replica: replica.name, lag, lag_bytes }.emit();
        }
        samples.forget_up_to(self.min_replayed());
    }
}

/// Marks the answer of a write that does not authenticate a bearer token (registration,
/// sign-in): its commit position is not remembered for whatever token the request carries.
#[derive(Debug, Clone, Copy)]
pub struct AnonymousWrite;

/// The `target` of `trellis_api_db_reads_total` for the primary.
pub const PRIMARY: &str = "primary";

/// The primary's WAL positions as polled, oldest first: a replica's lag in seconds is the age of
/// the oldest one it has not replayed.
///
/// Below the oldest position known (`floor`: the first one this process saw, or the newest
/// one dropped for room) the age is unknown: the primary may have passed it long before. A
/// replica behind the floor lags at least the floor's age, and is not used however small that
/// is, so that a process that has just started does not take a replica hours behind for fresh.
#[derive(Default)]
struct LagSamples {
    seen: std::collections::VecDeque<(Instant, Lsn)>,
    floor: Option<(Instant, Lsn)>,
}

/// Samples kept at most (past this many polls' time a lag is only known to be at least that).
const MAX_SAMPLES: usize = 4096;

impl LagSamples {
    fn push(&mut self, at: Instant, lsn: Lsn) {
        self.floor.get_or_insert((at, lsn));
        if self.seen.back().is_some_and(|(_, last)| *last >= lsn) {
            return;
        }
        if self.seen.len() == MAX_SAMPLES {
            self.floor = self.seen.pop_front();
        }
        self.seen.push_back((at, lsn));
    }

    /// How long before `now` the primary was first seen past `replayed` (zero if never), and
    /// whether that is known exactly (false: at least that).
    fn lag(&self, replayed: Lsn, now: Instant) -> (Duration, bool) {
        if let Some((at, floor)) = self.floor
            && replayed < floor
        {
            return (now.duration_since(at), false);
        }
        let lag =
            self.seen.iter().find(|(_, lsn)| *lsn > replayed).map_or(Duration::ZERO, |(at, _)| now.duration_since(*at));
        (lag, true)
    }

    fn forget_up_to(&mut self, replayed: Lsn) {
        while self.seen.front().is_some_and(|(_, lsn)| *lsn <= replayed) {
            self.seen.pop_front();
        }
    }
}

/// The last commit position of each bearer token (by its hash) that wrote through this process,
/// at most `capacity` of them. Full, it forgets the positions every replica has replayed; if that
/// frees less than half, it forgets them all and requires the highest of them of every read
/// instead (the floor), which sends reads to the primary until the replicas have replayed it:
/// wrong never, slower for a moment. A sweep thus comes once per `capacity / 2` new tokens at
/// most.
pub struct SessionLsns {
    inner: Mutex<SessionsInner>,
    capacity: usize,
}

struct SessionsInner {
    by_token: HashMap<[u8; 32], Lsn>,
    floor: Lsn,
}

impl SessionLsns {
    pub fn new(capacity: usize) -> Self {
        Self { inner: Mutex::new(SessionsInner { by_token: HashMap::new(), floor: Lsn(0) }), capacity: capacity.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionsInner> {
        self.inner.lock().expect("session positions lock")
    }

    /// What a read with this token must see.
    pub fn get(&self, token_hash: &[u8; 32]) -> Lsn {
        let inner = self.lock();
        inner.by_token.get(token_hash).copied().unwrap_or_default().max(inner.floor)
    }

    /// What a read without a token must see.
    pub fn floor(&self) -> Lsn {
        self.lock().floor
    }

    pub fn record(&self, token_hash: [u8; 32], lsn: Lsn, min_replayed: Lsn) {
        let mut inner = self.lock();
        if inner.by_token.len() >= self.capacity && !inner.by_token.contains_key(&token_hash) {
            inner.by_token.retain(|_, l| *l > min_replayed);
            // A sweep that frees less than half would be repeated too soon.
            if inner.by_token.len() > self.capacity / 2 {
                let highest = inner.by_token.values().copied().max().unwrap_or_default();
                inner.floor = inner.floor.max(highest);
                inner.by_token.clear();
            }
        }
        let entry = inner.by_token.entry(token_hash).or_default();
        *entry = (*entry).max(lsn);
    }

    pub fn len(&self) -> usize {
        self.lock().by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The database of a lag-tolerant read, chosen for the request: the primary without read
/// replicas; with them, a replica that has what the request must see, or the primary. A
/// `Trellis-Commit-LSN` that is not one position is a 400.
pub struct ReadDb {
    choice: Choice,
    replicas: Option<std::sync::Arc<ReadReplicas>>,
}

impl ReadDb {
    pub fn pool(&self) -> &PgPool {
        &self.choice.pool
    }

    /// Whether the read runs on a replica.
    pub fn on_replica(&self) -> bool {
        self.choice.replica.is_some()
    }

    /// The read runs on the primary from now on: a replica answered that the token does not
    /// authenticate, which the primary confirms or corrects (a token issued after the
    /// replica's position).
    pub fn confirm_on_primary(&mut self) {
        if let (Some(replicas), Some(_)) = (&self.replicas, self.choice.replica) {
            ReadFellBack { reason: ReplicaFallbackReason::Unauthenticated }.emit();
            self.choice = replicas.primary_choice();
        }
    }
}

impl FromRequestParts<AppState> for ReadDb {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let sent = requested_lsn(&parts.headers)?;
        let Some(replicas) = &state.read_replicas else {
            return Ok(ReadDb { choice: Choice { pool: state.pool.clone(), replica: None }, replicas: None });
        };
        let required = replicas.required(&parts.headers, sent);
        Ok(ReadDb { choice: replicas.choose(required), replicas: Some(replicas.clone()) })
    }
}

/// A lag-tolerant read's database ([`ReadDb`]) and its caller, authenticated on that database
/// (a 401 from a replica is checked on the primary).
pub struct Reader {
    pub db: ReadDb,
    pub principal: Principal,
}

impl Reader {
    pub fn pool(&self) -> &PgPool {
        self.db.pool()
    }
}

impl Reader {
    /// The caller of the bearer token hashed `token_hash`, authenticated on `db` (a 401 from a
    /// replica is checked on the primary); without a token, a 401.
    pub async fn authenticate(
        mut db: ReadDb,
        state: &AppState,
        token_hash: Option<[u8; 32]>,
    ) -> Result<Self, ApiError> {
        let Some(token_hash) = token_hash else { return Err(ApiError::Unauthenticated) };
        let mut principal = Principal::authenticate_hash(db.pool(), db.on_replica(), state, token_hash).await?;
        if principal.is_none() && db.on_replica() {
            db.confirm_on_primary();
            principal = Principal::authenticate_hash(db.pool(), false, state, token_hash).await?;
        }
        Ok(Reader { db, principal: principal.ok_or(ApiError::Unauthenticated)? })
    }
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let db = ReadDb::from_request_parts(parts, state).await?;
        Reader::authenticate(db, state, crate::auth::bearer(parts).map(crate::auth::hash_token)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_strictly_and_print_as_postgresql_does() {
        for (text, value) in [
            ("0/0", 0),
            ("16/B374D848", 0x16_B374_D848),
            ("16/b374d848", 0x16_B374_D848),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
            ("00000001/00000002", (1 << 32) | 2),
        ] {
            assert_eq!(Lsn::parse(text), Some(Lsn(value)), "{text}");
        }
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        for bad in
            ["", "/", "0/", "/0", "0", "0/0/0", " 0/0", "0/0 ", "+1/0", "-1/0", "0x1/0", "1/123456789", "g/0", "1 /2"]
        {
            assert_eq!(Lsn::parse(bad), None, "{bad:?} parsed");
        }
    }

    #[test]
    fn a_request_position_is_one_valid_header_or_a_400() {
        let mut headers = HeaderMap::new();
        assert_eq!(requested_lsn(&headers).unwrap(), None);
        headers.insert(COMMIT_LSN_HEADER, "1/A".parse().unwrap());
        assert_eq!(requested_lsn(&headers).unwrap(), Some(Lsn((1 << 32) | 10)));
        headers.append(COMMIT_LSN_HEADER, "1/B".parse().unwrap());
        assert!(matches!(requested_lsn(&headers), Err(ApiError::BadRequest { slug: "invalid-commit-lsn", .. })));
        let mut headers = HeaderMap::new();
        headers.insert(COMMIT_LSN_HEADER, "latest".parse().unwrap());
        assert!(matches!(requested_lsn(&headers), Err(ApiError::BadRequest { slug: "invalid-commit-lsn", .. })));
    }

    #[test]
    fn read_urls_parse_into_named_replicas() {
        assert!(parse_urls("").unwrap().is_empty());
        assert!(parse_urls("  ").unwrap().is_empty());
        let replicas =
            parse_urls("postgres://u:pw@db-r1:5433/trellis, postgresql://db-r2/trellis?sslmode=disable").unwrap();
        let names: Vec<&str> = replicas.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["db-r1:5433", "db-r2:5432"]);
        assert_eq!(replicas[0].url.expose(), "postgres://u:pw@db-r1:5433/trellis");
    }

    #[test]
    fn bad_read_urls_are_named_without_their_password() {
        let err = parse_urls("mysql://u:hunter2@db/trellis").unwrap_err();
        assert!(err.contains("is not a postgres:// URL") && !err.contains("hunter2"), "{err}");
        let err = parse_urls("postgres://u:hunter2@db:notaport/trellis").unwrap_err();
        assert!(err.contains("is not a valid URL") && !err.contains("hunter2"), "{err}");
        let err = parse_urls("postgres://db-r1/trellis,,postgres://db-r2/trellis").unwrap_err();
        assert!(err.contains("URL 2 of the list is empty"), "{err}");
        let err = parse_urls("postgres://db-r1/trellis,postgres://db-r1:5432/other").unwrap_err();
        assert!(err.contains("db-r1:5432 is listed twice"), "{err}");
    }

    #[test]
    fn settings_need_a_lag_bound_above_the_poll_interval() {
        let settings = |poll_ms, lag_ms, sessions| Settings {
            replicas: Vec::new(),
            poll_interval: Duration::from_millis(poll_ms),
            max_lag: Duration::from_millis(lag_ms),
            sessions,
        };
        settings(100, 5000, 10).check().unwrap();
        assert!(settings(100, 100, 10).check().unwrap_err().contains("must exceed DATABASE_READ_POLL_INTERVAL"));
        assert!(settings(0, 100, 10).check().unwrap_err().contains("DATABASE_READ_POLL_INTERVAL must be more than 0"));
        assert!(settings(100, 5000, 0).check().unwrap_err().contains("DATABASE_READ_SESSIONS"));
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_position_not_replayed() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut samples = LagSamples::default();
        samples.push(t0, Lsn(100));
        samples.push(t0 + ms(100), Lsn(200));
        samples.push(t0 + ms(200), Lsn(200));
        samples.push(t0 + ms(300), Lsn(300));
        let now = t0 + ms(400);
        assert_eq!(samples.lag(Lsn(300), now), (Duration::ZERO, true));
        assert_eq!(samples.lag(Lsn(250), now), (ms(100), true));
        assert_eq!(samples.lag(Lsn(150), now), (ms(300), true));
        assert_eq!(samples.lag(Lsn(100), now), (ms(300), true));
        // Behind the first position seen: how far behind is unknown.
        assert_eq!(samples.lag(Lsn(99), now), (ms(400), false));
        samples.forget_up_to(Lsn(250));
        assert_eq!(samples.lag(Lsn(250), now), (ms(100), true), "what every replica replayed is forgotten");
        assert_eq!(samples.lag(Lsn(50), now), (ms(400), false), "the floor stays");
    }

    #[test]
    fn samples_dropped_for_room_raise_the_floor() {
        let t0 = Instant::now();
        let mut samples = LagSamples::default();
        // Positions 1, 2, …, two more than there is room for: 1 and 2 are dropped.
        for i in 0..MAX_SAMPLES as u64 + 2 {
            samples.push(t0 + Duration::from_millis(i), Lsn(i + 1));
        }
        let now = t0 + Duration::from_secs(10);
        assert_eq!(samples.seen.len(), MAX_SAMPLES);
        assert_eq!(samples.lag(Lsn(1), now), (Duration::from_millis(9_999), false));
        assert_eq!(samples.lag(Lsn(2), now), (Duration::from_millis(9_998), true));
    }

    #[test]
    fn a_full_session_record_forgets_what_is_replayed_then_raises_its_floor() {
        let sessions = SessionLsns::new(2);
        let (a, b, c, d) = ([1; 32], [2; 32], [3; 32], [4; 32]);
        sessions.record(a, Lsn(10), Lsn(0));
        sessions.record(b, Lsn(20), Lsn(0));
        assert_eq!((sessions.get(&a), sessions.get(&b), sessions.get(&c)), (Lsn(10), Lsn(20), Lsn(0)));
        sessions.record(a, Lsn(5), Lsn(0));
        assert_eq!(sessions.get(&a), Lsn(10), "a position never goes back");
        // Full: a is replayed everywhere and goes; b stays.
        sessions.record(c, Lsn(30), Lsn(15));
        assert_eq!((sessions.get(&a), sessions.get(&b), sessions.get(&c)), (Lsn(0), Lsn(20), Lsn(30)));
        // Full of positions not replayed: every read must see the highest of them.
        sessions.record(d, Lsn(25), Lsn(15));
        assert_eq!(sessions.len(), 1);
        assert_eq!((sessions.get(&a), sessions.get(&d), sessions.floor()), (Lsn(30), Lsn(30), Lsn(30)));
        // Once replayed, the next full record forgets them.
        sessions.record(a, Lsn(40), Lsn(0));
        sessions.record(b, Lsn(50), Lsn(40));
        assert_eq!((sessions.len(), sessions.get(&a), sessions.get(&b)), (1, Lsn(30), Lsn(50)));
        assert!(!sessions.is_empty());
    }
}
