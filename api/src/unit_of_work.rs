//! The unit of work: the one path of every write, and how long any request may take.
//!
//! A write request (POST, PUT, PATCH, DELETE) gets a [`UnitOfWork`]. Its handler takes the
//! transaction from it ([`UnitOfWork::begin`]), makes every read and write of the request in
//! it (its changes through `trellis_commands`), and hands it back with the events its commands
//! caused ([`UnitOfWork::finish`]) instead of committing: `finish` is the API's
//! `trellis_commands::commit_with`, which writes the events into the transaction (the one
//! writer of outbox rows) and gives the transaction back to the layer. The layer commits after
//! the handler answered with a success, and rolls back on any other answer (the events with
//! it). With an `Idempotency-Key`, the layer authenticates the caller, begins the transaction
//! and takes the key in it before the handler runs, and stores the response in it before the
//! commit: key, change, events and response commit together ([`crate::idempotency`]).
//!
//! Deadlines. A read may take `REQUEST_TIMEOUT`. A write's handler may take `REQUEST_TIMEOUT`
//! less `IO_TIMEOUT`, and its commit `IO_TIMEOUT`: a statement still running when the handler is
//! cut off ends within `IO_TIMEOUT` (the server's `statement_timeout`), so a transaction, and the
//! idempotency key it holds, never outlives `REQUEST_TIMEOUT`. A commit is never cut off by a
//! "retry" answer.
//!
//! Lost connections. The pool does not test connections before handing them out, so after the
//! server ended its backends the first statements meet dead connections (each is discarded
//! once it failed). A request that failed that way before its commit was sent changed nothing:
//! it runs again, up to once more than the pool holds connections. A commit whose connection is
//! lost (or that outlived its deadline) is never answered "retry": with a key, the request runs
//! again, and its key answers what happened (the stored response if the commit happened, a 409
//! while it is still finishing, the change made now if it did not); without a key, or when the
//! database cannot be reached to find out, the answer is a 500 that says the outcome is unknown.
//!
//! Commit positions. With read replicas (`DATABASE_READ_URL`), every successful write's answer
//! carries `Trellis-Commit-LSN`, read after the commit, and the position is remembered for the
//! request's bearer token, so that the caller's next lag-tolerant read sees the write
//! ([`crate::read_replicas`]). Without them, no position is read.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::{PgPool, Postgres, Transaction};
use trellis_commands::{Committer, Committing, Emitted};
use trellis_store::Tx;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, LostConnection};
use crate::idempotency::{self, Keyed};
use crate::read_replicas::{AnonymousWrite, COMMIT_LSN_HEADER, ReadReplicas};
use crate::token_cache::Evict;

/// A write request's transaction, shared by the layer and the handler.
#[derive(Clone)]
pub struct UnitOfWork(Arc<Inner>);

struct Inner {
    pool: PgPool,
    slot: Mutex<Slot>,
    /// What the token cache forgets once the transaction has committed.
    evictions: Mutex<Vec<Evict>>,
    /// Whether the transaction writes events: the relay is woken once it has committed.
    wrote_events: std::sync::atomic::AtomicBool,
}

enum Slot {
    /// No transaction yet.
    Unused,
    /// Begun by the layer (with the request's key in it), not yet taken by the handler.
    Ready(Tx<'static>),
    /// Taken by the handler.
    Lent,
    /// Handed back by the handler, to commit.
    Returned(Tx<'static>),
}

impl UnitOfWork {
    fn new(pool: PgPool) -> Self {
        Self(Arc::new(Inner {
            pool,
            slot: Mutex::new(Slot::Unused),
            evictions: Mutex::default(),
            wrote_events: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.0.slot.lock().expect("unit of work lock")
    }

    fn hold(&self, tx: Tx<'static>) {
        *self.slot() = Slot::Ready(tx);
    }

    fn end(&self) -> Slot {
        std::mem::replace(&mut *self.slot(), Slot::Lent)
    }

    /// The request's transaction: the one holding its `Idempotency-Key`, or a new one (begun on
    /// a live connection, see [`trellis_store::begin`]). Once per request.
    pub async fn begin(&self) -> Result<Tx<'static>, ApiError> {
        let held = match std::mem::replace(&mut *self.slot(), Slot::Lent) {
            Slot::Ready(tx) => Some(tx),
            Slot::Unused => None,
            Slot::Lent | Slot::Returned(_) => {
                return Err(ApiError::Internal(anyhow::anyhow!("a unit of work is begun once")));
            }
        };
        match held {
            Some(tx) => Ok(tx),
            None => Ok(trellis_store::begin(&self.0.pool).await?),
        }
    }

    /// Has this process's token cache forget `evict` as soon as the transaction has committed
    /// (or its commit's outcome is unknown): a revocation made here takes effect here at once,
    /// without waiting for the database's notification.
    pub fn evict_after_commit(&self, evict: Evict) {
        self.0.evictions.lock().expect("unit of work lock").push(evict);
    }

    fn take_evictions(&self) -> Vec<Evict> {
        std::mem::take(&mut *self.0.evictions.lock().expect("unit of work lock"))
    }

    /// Hands the transaction back with the events of its commands, which are written into it
    /// now: it commits with the response if that is a success. Returns what the commands did.
    pub async fn finish<T: Send>(&self, tx: Tx<'static>, emitted: Emitted<T>) -> Result<T, ApiError> {
        if emitted.has_events() {
            self.0.wrote_events.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(trellis_commands::commit_with(tx, emitted, HandBack(self)).await?)
    }
}

/// The unit of work's [`Committer`]: the transaction goes back to the layer, which commits it.
struct HandBack<'w>(&'w UnitOfWork);

impl Committer<'static> for HandBack<'_> {
    fn commit(self, tx: Transaction<'static, Postgres>) -> Committing<'static> {
        *self.0.slot() = Slot::Returned(tx);
        Box::pin(std::future::ready(Ok(())))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for UnitOfWork {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<UnitOfWork>().cloned().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "{} {} has no unit of work: only writes have one",
                parts.method,
                parts.uri
            ))
        })
    }
}

fn is_write(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// What an attempt at a request came to.
struct Attempt {
    response: Response,
    /// Set when a commit's outcome was lost: the cause.
    commit_lost: Option<String>,
}

impl From<Response> for Attempt {
    fn from(response: Response) -> Self {
        Self { response, commit_lost: None }
    }
}

/// Runs a request within its deadline, again while it lost its database connection before
/// committing anything (or lost a keyed commit); a write in its unit of work.
pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let write = is_write(request.method());
    let deadline = tokio::time::Instant::now() + state.config.request_timeout;
    let work_deadline = deadline - state.config.common.io_timeout;
    let (parts, body) = request.into_parts();
    // A read's body is never read; a write's is kept to run it again.
    let body = if write {
        match tokio::time::timeout_at(work_deadline, axum::body::to_bytes(body, state.config.body_limit_bytes)).await {
            Ok(Ok(body)) => body,
            Ok(Err(_)) => return ApiError::PayloadTooLarge.into_response(),
            Err(_) => return timed_out(),
        }
    } else {
        drop(body);
        Bytes::new()
    };
    let attempts = state.pool.options().get_max_connections() + 1;
    let mut attempt = 1;
    let mut commit_lost = None;
    loop {
        let outcome = if write {
            run_write(&state, parts.clone(), &body, next.clone(), work_deadline, deadline).await
        } else {
            let request = Request::from_parts(parts.clone(), Body::empty());
            match tokio::time::timeout_at(deadline, next.clone().run(request)).await {
                Ok(response) => response.into(),
                Err(_) => timed_out().into(),
            }
        };
        let lost = outcome.response.extensions().get::<LostConnection>().is_some();
        let again = lost || outcome.commit_lost.is_some();
        commit_lost = outcome.commit_lost.or(commit_lost);
        if again && attempt < attempts && tokio::time::Instant::now() < work_deadline {
            tracing::info!(attempt, method = %parts.method, commit_lost = commit_lost.is_some(), "running the request again after a lost database connection");
            attempt += 1;
            continue;
        }
        let response = match commit_lost {
            // The last attempt could not tell whether an earlier one committed.
            Some(cause) if again || outcome.response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                ApiError::OutcomeUnknown { cause }.into_response()
            }
            _ => outcome.response,
        };
        return match &state.read_replicas {
            Some(replicas) if write && response.status().is_success() => {
                with_commit_lsn(replicas, &parts.headers, response).await
            }
            _ => response,
        };
    }
}

/// A successful write's answer with `Trellis-Commit-LSN`: a position at or past its commit (or,
/// for a replayed answer, past the commit it replays), remembered for its bearer token.
async fn with_commit_lsn(replicas: &ReadReplicas, headers: &HeaderMap, mut response: Response) -> Response {
    let authenticated = response.extensions().get::<AnonymousWrite>().is_none();
    if let Some(lsn) = replicas.written(headers, authenticated).await {
        let value = HeaderValue::from_str(&lsn.to_string()).expect("an LSN is a header value");
        response.headers_mut().insert(COMMIT_LSN_HEADER, value);
    }
    response
}

fn timed_out() -> Response {
    ApiError::Unavailable { cause: "request timed out".into() }.into_response()
}

async fn run_write(
    state: &AppState,
    parts: Parts,
    body: &Bytes,
    next: Next,
    work_deadline: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> Attempt {
    let (method, path) = (parts.method.clone(), parts.uri.path().to_owned());
    // Cut off here, whatever the handler holds rolls back: nothing was committed.
    let handled = match tokio::time::timeout_at(work_deadline, handle_write(state, parts, body, next)).await {
        Ok(Ok(handled)) => handled,
        Ok(Err(e)) => return e.into_response().into(),
        Err(_) => return timed_out().into(),
    };
    let (tx, response, keyed, evictions, wrote_events) = match handled {
        Handled::Answer(response) => return response.into(),
        Handled::Commit { tx, response, keyed, evictions, wrote_events } => {
            (tx, response, keyed, evictions, wrote_events)
        }
    };
    let committed = tokio::time::timeout_at(deadline, tx.commit()).await;
    // Whether the commit happened or its outcome is unknown, forgetting is safe.
    for evict in evictions {
        state.token_cache.evict(evict);
    }
    // This process's writes do not notify the relays through the database (see
    // `AppState::relay_wake`): its own relay is woken here. A wake for nothing costs one look.
    if wrote_events && let Some(wake) = &state.relay_wake {
        wake.notify_one();
    }
    match committed {
        Ok(Ok(())) => response.into(),
        Ok(Err(e)) if !trellis_store::is_connection_lost(&e) => ApiError::from(e).into_response().into(),
        lost => {
            let cause = match lost {
                Ok(Err(e)) => format!("{method} {path}: the connection was lost committing: {e}"),
                _ => format!("{method} {path}: the commit did not finish within the request's deadline"),
            };
            if keyed {
                Attempt {
                    response: ApiError::OutcomeUnknown { cause: cause.clone() }.into_response(),
                    commit_lost: Some(cause),
                }
            } else {
                ApiError::OutcomeUnknown { cause }.into_response().into()
            }
        }
    }
}

/// A handled write: an answer, or a transaction to commit and the answer once it is.
enum Handled {
    Answer(Response),
    Commit { tx: Tx<'static>, response: Response, keyed: bool, evictions: Vec<Evict>, wrote_events: bool },
}

async fn handle_write(state: &AppState, mut parts: Parts, body: &Bytes, next: Next) -> Result<Handled, ApiError> {
    let work = UnitOfWork::new(state.pool.clone());
    let keyed = match idempotency::requested_key(&parts)? {
        None => None,
        Some(key) => {
            let principal = Principal::authenticate(state, &parts.headers).await?.ok_or(ApiError::Unauthenticated)?;
            let keyed = Keyed::new(&principal, key, &parts, body);
            parts.extensions.insert(principal);
            let mut tx = trellis_store::begin(&state.pool).await?;
            if let Some(answer) = idempotency::take(state, &mut tx, &keyed).await? {
                return Ok(Handled::Answer(answer));
            }
            work.hold(tx);
            Some(keyed)
        }
    };
    parts.extensions.insert(work.clone());
    let (method, path) = (parts.method.clone(), parts.uri.path().to_owned());
    let response = next.run(Request::from_parts(parts, Body::from(body.clone()))).await;
    let slot = work.end();
    if !response.status().is_success() {
        // Dropping the transaction rolls back whatever the handler wrote, and the key with it.
        return Ok(Handled::Answer(response));
    }
    let mut tx = match slot {
        Slot::Ready(tx) | Slot::Returned(tx) => tx,
        Slot::Unused => return Ok(Handled::Answer(response)),
        Slot::Lent => {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "{method} {path} answered {} without handing back its transaction",
                response.status()
            )));
        }
    };
    let response = match &keyed {
        Some(keyed) => idempotency::store(&mut tx, keyed, response).await?,
        None => response,
    };
    let wrote_events = work.0.wrote_events.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Handled::Commit { tx, response, keyed: keyed.is_some(), evictions: work.take_evictions(), wrote_events })
}
