//! Bearer tokens, password hashing and the authenticated principal.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use trellis_domain::UserId;
use trellis_domain::identity::{Password, Role};

use crate::app::AppState;
use crate::error::ApiError;
use crate::instrument::{HashOperation, PasswordHashStarted, RequestShed, ShedReason};
use crate::token_cache::{Cached, Lookup};

/// A bearer token as handed to the client: 256 random bits, base64url, prefixed `trl_`.
pub struct IssuedToken {
    pub token: String,
    pub expires_at: OffsetDateTime,
}

pub fn new_token() -> (String, [u8; 32]) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("trl_{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_token(&token);
    (token, hash)
}

/// Only this hash is ever stored.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whom a token is issued to, and on what condition.
pub struct TokenRequest<'a> {
    pub user: UserId,
    /// The client's address, shown in its sessions.
    pub client_addr: std::net::IpAddr,
    /// For a sign-in: the password hash it checked, which must still be the user's.
    pub checked_password_hash: Option<&'a str>,
}

/// Creates a token and stores its hash (`trellis_store::identity::issue_token`: the user must
/// be active, and their oldest tokens past the cap are revoked). `None` when the user is not
/// active or their password changed since it was checked.
pub async fn issue_token(
    conn: &mut sqlx::PgConnection,
    config: &crate::config::Config,
    request: &TokenRequest<'_>,
) -> Result<Option<IssuedToken>, sqlx::Error> {
    issue_token_for(conn, config, request, config.token_ttl).await
}

/// [`issue_token`] with a lifetime of its own (the console's sessions).
pub async fn issue_token_for(
    conn: &mut sqlx::PgConnection,
    config: &crate::config::Config,
    request: &TokenRequest<'_>,
    ttl: std::time::Duration,
) -> Result<Option<IssuedToken>, sqlx::Error> {
    let (token, hash) = new_token();
    let expires_at = OffsetDateTime::now_utc() + ttl;
    let client_addr = request.client_addr.to_string();
    let new = trellis_store::identity::NewToken {
        token_hash: &hash,
        user_id: request.user,
        expires_at,
        client_addr: Some(&client_addr),
        checked_password_hash: request.checked_password_hash,
    };
    let issued = trellis_store::identity::issue_token(conn, &new, config.token_limits()).await?;
    Ok(issued.then_some(IssuedToken { token, expires_at }))
}

/// Bounds the password hashing and verification in progress: each is argon2id with the
/// crate's defaults (19 MiB, 2 passes). `PASSWORD_HASH_CONCURRENCY` run at once, each on one of
/// as many threads the slots own, and `PASSWORD_HASH_QUEUE` more wait; beyond that a request is
/// answered 503 with `Retry-After` at once.
///
/// The slots' own threads, rather than tokio's blocking pool, for two reasons. Memory: each
/// thread owns the 19 MiB that argon2 works in, allocated once when the thread starts, so the
/// process's memory is the same before, during and after a flood of logins (allocating it per
/// hash left the allocator holding freed blocks: +64 to +76 MiB at the peak of a flood).
/// Latency: the threads run at the lowest scheduling priority (nice [`HASHING_NICE`]), so a
/// flood of logins or registrations, which keeps every hashing thread busy, does not take the
/// CPU from the requests that need no hash (at nice 10, a flood of sign-ins with made-up logins
/// raised a reader's p99 3.3 to 3.8 times: its dummy verifications kept every hashing thread
/// runnable at a tenth of a normal thread's weight; at 19 that weight is about a seventieth).
pub struct HashingSlots {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue: usize,
    jobs: std::sync::mpsc::Sender<HashJob>,
}

/// The nice value of the hashing threads (0 is normal, 19 the lowest priority).
pub const HASHING_NICE: i32 = 19;

type HashJob = Box<dyn FnOnce(&mut ThreadHasher) + Send>;

/// Decrements the queue length when a waiter leaves it, however it leaves.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HashingSlots {
    pub fn new(concurrency: usize, queue: usize) -> Self {
        let concurrency = concurrency.max(1);
        let (jobs, receiver) = std::sync::mpsc::channel::<HashJob>();
        let receiver = Arc::new(std::sync::Mutex::new(receiver));
        for i in 0..concurrency {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || hashing_thread(&receiver))
                .expect("spawning a password-hashing thread");
        }
        Self { permits: Arc::new(Semaphore::new(concurrency)), waiting: AtomicUsize::new(0), queue, jobs }
    }

    /// A slot for one hash, waiting in the queue when it has room.
    async fn enter(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queue = self.queue;
        self.waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w < queue).then_some(w + 1)).map_err(
            |_| {
                RequestShed { reason: ShedReason::PasswordHashing }.emit();
                ApiError::Overloaded { retry_after_secs: 1 }
            },
        )?;
        let _waiting = Waiting(&self.waiting);
        Ok(self.permits.clone().acquire_owned().await.expect("the hashing semaphore is never closed"))
    }

    /// A slot for one hash, taken before the work that leads to it (a sign-in's account lookup):
    /// when hashing is saturated, a request is answered 503 before it costs a query.
    pub async fn reserve(&self) -> Result<HashingSlot, ApiError> {
        self.enter().await.map(HashingSlot)
    }

    /// Runs `work` on a hashing thread once a slot is free. The permit moves with the work: a
    /// request cut off by its timeout does not free the slot while its hash still runs.
    async fn run<T: Send + 'static>(
        &self,
        operation: HashOperation,
        work: impl FnOnce(&mut ThreadHasher) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let slot = self.reserve().await?;
        self.run_in(slot, operation, work).await
    }

    async fn run_in<T: Send + 'static>(
        &self,
        HashingSlot(permit): HashingSlot,
        operation: HashOperation,
        work: impl FnOnce(&mut ThreadHasher) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        PasswordHashStarted { operation }.emit();
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |hasher: &mut ThreadHasher| {
                let _permit = permit;
                let _ = done.send(work(hasher));
            }))
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("the password-hashing threads have ended")))?;
        // A panic in `work` drops `done`: the request fails, the thread goes on.
        let outcome = result.await.map_err(|_| ApiError::Internal(anyhow::anyhow!("password hashing panicked")))?;
        Ok(outcome?)
    }

    /// Hashes with argon2id (the crate's default parameters) on a hashing thread.
    pub async fn hash_password(&self, password: Password) -> Result<String, ApiError> {
        self.run(HashOperation::Hash, move |hasher| {
            let mut salt = [0u8; 16];
            rand::rng().fill_bytes(&mut salt);
            let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
            let hash = hasher
                .hash(
                    Algorithm::default(),
                    Version::default(),
                    Params::default(),
                    password.expose().as_bytes(),
                    salt.as_salt(),
                )
                .map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
            Ok(hash.to_string())
        })
        .await
    }

    /// Verifies on a hashing thread. With no stored hash (unknown login) it verifies against
    /// a fixed dummy so that the response takes as long either way.
    pub async fn verify_password(&self, candidate: String, stored: Option<String>) -> Result<bool, ApiError> {
        let slot = self.reserve().await?;
        self.verify_password_in(slot, candidate, stored).await
    }

    /// [`HashingSlots::verify_password`] in a slot reserved before.
    pub async fn verify_password_in(
        &self,
        slot: HashingSlot,
        candidate: String,
        stored: Option<String>,
    ) -> Result<bool, ApiError> {
        self.run_in(slot, HashOperation::Verify, move |hasher| {
            let known = stored.is_some();
            let hash_text = stored.unwrap_or_else(|| hasher.dummy.clone());
            let hash = PasswordHash::new(&hash_text).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
            // A stored hash this crate cannot check matches no password.
            Ok(hasher.verify(candidate.as_bytes(), &hash).unwrap_or(false) && known)
        })
        .await
    }
}

/// One reserved place among the hashes running at once, given back when dropped.
pub struct HashingSlot(OwnedSemaphorePermit);

/// argon2 in the memory of one hashing thread: the crate's `hash_password` allocates its
/// working memory on every call; this hashes into `memory`, which the thread keeps.
pub struct ThreadHasher {
    memory: Vec<Block>,
    /// A hash of a fixed password, verified against for unknown logins.
    dummy: String,
}

impl ThreadHasher {
    /// Allocates the memory of the default parameters and uses it once (the dummy hash), so that
    /// the thread's memory is in place before the first request.
    pub fn new() -> Self {
        let mut hasher = Self { memory: vec![Block::default(); Params::default().block_count()], dummy: String::new() };
        let salt = SaltString::encode_b64(b"trellis-dummy-salt").expect("a constant salt encodes");
        hasher.dummy = hasher
            .hash(
                Algorithm::default(),
                Version::default(),
                Params::default(),
                b"trellis-dummy-password",
                salt.as_salt(),
            )
            .expect("hashing a constant")
            .to_string();
        hasher
    }

    /// What `argon2::PasswordHasher::hash_password` computes, in this thread's memory (grown
    /// when a stored hash asks for more than the default parameters).
    pub fn hash<'a>(
        &mut self,
        algorithm: Algorithm,
        version: Version,
        params: Params,
        password: &[u8],
        salt: Salt<'a>,
    ) -> argon2::password_hash::Result<PasswordHash<'a>> {
        let mut salt_bytes = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_bytes)?;
        let blocks = params.block_count();
        if self.memory.len() < blocks {
            self.memory.resize(blocks, Block::default());
        }
        let argon2 = Argon2::new(algorithm, version, params.clone());
        let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let memory = &mut self.memory[..blocks];
        let output = Output::init_with(output_len, |out| {
            Ok(argon2.hash_password_into_with_memory(password, salt_bytes, out, &mut *memory)?)
        })?;
        Ok(PasswordHash {
            algorithm: algorithm.ident(),
            version: Some(version.into()),
            params: ParamsString::try_from(&params)?,
            salt: Some(salt),
            hash: Some(output),
        })
    }

    /// Whether `password` matches `stored`, compared in constant time; an error when `stored`
    /// is not an argon2 hash this crate can check.
    pub fn verify(&mut self, password: &[u8], stored: &PasswordHash<'_>) -> argon2::password_hash::Result<bool> {
        let (Some(salt), Some(expected)) = (stored.salt, &stored.hash) else {
            return Err(argon2::password_hash::Error::Password);
        };
        let algorithm = Algorithm::try_from(stored.algorithm)?;
        let version = stored.version.map(Version::try_from).transpose()?.unwrap_or_default();
        let params = Params::try_from(stored)?;
        let computed = self.hash(algorithm, version, params, password, salt)?;
        // `Output`'s equality is constant-time.
        Ok(computed.hash.as_ref() == Some(expected))
    }
}

impl Default for ThreadHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// One hashing thread: lowers its own priority, then runs jobs until the slots are dropped.
fn hashing_thread(jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<HashJob>>) {
    // Linux applies a nice value set for a thread id to that thread alone. Where it cannot be
    // set, hashing runs at normal priority: slower answers under a flood, nothing worse.
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), HASHING_NICE) {
        tracing::warn!(error = %e, "could not lower the priority of a password-hashing thread");
    }
    let mut hasher = ThreadHasher::new();
    loop {
        let job = match jobs.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // The job's panic is reported to its request through the dropped sender.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut hasher)));
    }
}

/// The caller, authenticated by a live bearer token of an active user.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: UserId,
    pub role: Role,
    pub token_hash: [u8; 32],
}

impl Principal {
    pub fn require_moderator(&self) -> Result<(), ApiError> {
        if self.role.can_moderate() { Ok(()) } else { Err(ApiError::Forbidden("this needs the moderator role")) }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::Admin { Ok(()) } else { Err(ApiError::Forbidden("this needs the admin role")) }
    }
}

/// The bearer token of a request, if it has one.
pub fn bearer(parts: &Parts) -> Option<&str> {
    bearer_from_headers(&parts.headers)
}

pub fn bearer_from_headers(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The hash of the request's bearer token, not yet checked: for handlers that authenticate in
/// the same statement as their query. Without a token it is a 401.
#[derive(Debug, Clone)]
pub struct BearerToken {
    pub hash: [u8; 32],
}

impl<S: Send + Sync> FromRequestParts<S> for BearerToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(ApiError::Unauthenticated)?;
        Ok(BearerToken { hash: hash_token(token) })
    }
}

impl Principal {
    /// The principal behind `headers`' bearer token; `None` without a token or when it does not
    /// authenticate. Only an authenticated request counts as activity (of the token and its
    /// user).
    pub async fn authenticate(state: &AppState, headers: &axum::http::HeaderMap) -> Result<Option<Self>, ApiError> {
        Self::authenticate_on(&state.pool, false, state, headers).await
    }

    /// [`Principal::authenticate`] on `db`: the primary, or (`on_replica`) the read replica of
    /// a lag-tolerant read (`crate::read_replicas::Reader`). A token in the token cache is not
    /// looked up; one the primary authenticates is put in it (never one a replica does: see
    /// `crate::token_cache`).
    pub async fn authenticate_on(
        db: &sqlx::PgPool,
        on_replica: bool,
        state: &AppState,
        headers: &axum::http::HeaderMap,
    ) -> Result<Option<Self>, ApiError> {
        let Some(token) = bearer_from_headers(headers) else { return Ok(None) };
        Self::authenticate_hash(db, on_replica, state, hash_token(token)).await
    }

    /// [`Principal::authenticate_on`] for a token already hashed ([`BearerToken`]).
    pub async fn authenticate_hash(
        db: &sqlx::PgPool,
        on_replica: bool,
        state: &AppState,
        token_hash: [u8; 32],
    ) -> Result<Option<Self>, ApiError> {
        let ticket = match state.token_cache.lookup(&token_hash) {
            Lookup::Hit(cached) => {
                state.activity.saw(token_hash);
                return Ok(Some(Principal { user_id: cached.user_id, role: cached.role, token_hash }));
            }
            Lookup::Miss(ticket) => (!on_replica).then_some(ticket),
            Lookup::Bypassed => None,
        };
        let idle = state.config.token_idle_timeout;
        let Some(found) = trellis_store::identity::authenticate(db, &token_hash, idle).await? else {
            return Ok(None);
        };
        let principal = Principal { user_id: UserId(found.user_id), role: found.role, token_hash };
        if let Some(ticket) = ticket {
            let cached = Cached { user_id: principal.user_id, role: principal.role };
            state.token_cache.insert(ticket, token_hash, cached, found.live_for());
        }
        state.activity.saw(token_hash);
        Ok(Some(principal))
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    /// The principal the idempotency layer authenticated already, or the request's own.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
        Principal::authenticate(state, &parts.headers).await?.ok_or(ApiError::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use argon2::PasswordHasher as _;

    use super::*;

    #[test]
    fn a_thread_hasher_computes_what_argon2_computes_in_memory_it_reuses() {
        let mut hasher = ThreadHasher::new();
        for password in [b"correct horse battery".as_slice(), b"another password entirely"] {
            let salt = SaltString::encode_b64(b"sixteen byte slt").unwrap();
            let ours = hasher
                .hash(Algorithm::default(), Version::default(), Params::default(), password, salt.as_salt())
                .unwrap()
                .to_string();
            let reference = Argon2::default().hash_password(password, &salt).unwrap().to_string();
            assert_eq!(ours, reference);
            let parsed = PasswordHash::new(&reference).unwrap();
            assert!(hasher.verify(password, &parsed).unwrap());
            assert!(!hasher.verify(b"wrong", &parsed).unwrap());
        }
    }

    #[test]
    fn a_hash_made_with_other_parameters_verifies_and_grows_the_memory_as_needed() {
        let mut hasher = ThreadHasher::new();
        let params = Params::new(Params::DEFAULT_M_COST * 2, 1, 1, None).unwrap();
        let salt = SaltString::encode_b64(b"sixteen byte slt").unwrap();
        let stored = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(b"pw with more memory", &salt)
            .unwrap()
            .to_string();
        let parsed = PasswordHash::new(&stored).unwrap();
        assert!(hasher.verify(b"pw with more memory", &parsed).unwrap());
        assert!(!hasher.verify(b"pw with less memory", &parsed).unwrap());
    }

    #[test]
    fn tokens_are_256_bit_and_hashed() {
        let (token, hash) = new_token();
        assert!(token.starts_with("trl_"));
        assert_eq!(URL_SAFE_NO_PAD.decode(&token[4..]).unwrap().len(), 32);
        assert_eq!(hash, hash_token(&token));
        assert_ne!(new_token().0, token);
    }

    #[tokio::test]
    async fn passwords_verify_only_against_their_own_hash() {
        let slots = HashingSlots::new(1, 1);
        let hash = slots.hash_password(Password::parse("correct horse battery").unwrap()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(slots.verify_password("correct horse battery".into(), Some(hash.clone())).await.unwrap());
        assert!(!slots.verify_password("wrong horse battery".into(), Some(hash)).await.unwrap());
        assert!(!slots.verify_password("trellis-dummy-password".into(), None).await.unwrap());
    }

    #[tokio::test]
    async fn full_hashing_slots_answer_overloaded_at_once_and_frees_its_queue() {
        let slots = HashingSlots::new(1, 1);
        let busy = slots.enter().await.unwrap();
        let queued = slots.enter();
        tokio::pin!(queued);
        // The queued request waits (its slot in the queue is taken when it is first polled).
        assert!(futures::poll!(queued.as_mut()).is_pending());
        let refused = slots.enter().await.unwrap_err();
        assert!(matches!(refused, ApiError::Overloaded { .. }), "{refused:?}");
        drop(busy);
        let second = queued.await.unwrap();
        drop(second);
        assert_eq!(slots.waiting.load(Ordering::Acquire), 0);
        assert!(slots.enter().await.is_ok());
    }
}
