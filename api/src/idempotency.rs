//! `Idempotency-Key` on the authenticated POST, PUT, PATCH and DELETE requests.
//!
//! The first request with a key is processed and its response stored, in the transaction of
//! its unit of work ([`crate::unit_of_work`]): the key, the change and the stored response
//! commit together or not at all, so a crash or a lost connection leaves nothing "in progress".
//! A retry with the same key and the same request gets the stored response
//! (`Idempotent-Replayed: true`); the same key with another request is a 422; a retry while the
//! first is still running is a 409. Only successful (2xx) responses are stored: an error changed
//! nothing, so a retry is processed again.
//!
//! Keys belong to the authenticated user (any of their tokens), who is authenticated before the
//! key is looked at: a request whose token does not authenticate is a 401 and stores nothing.
//! The routes anyone may call ([`ANONYMOUS_WRITES`]) ignore the header. Keys expire after
//! `IDEMPOTENCY_TTL`; the row keeps hashes of the path and of the request, never the path.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use trellis_store::idempotency::{self, KeyRequest, StoredKey, Taken};

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::ApiError;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";
/// The longest key accepted, in characters (visible ASCII).
pub const MAX_KEY_LENGTH: usize = 255;

/// The writes anyone may call, as (method, path): registration and sign-in. They do not honour
/// `Idempotency-Key`: a replayed response would hand out a token without the checks of a
/// sign-in, and a key no user owns would let anonymous callers fill the table. A client that
/// lost a registration's response signs in with the password it chose.
pub const ANONYMOUS_WRITES: [(&str, &str); 2] = [("POST", "/v1/users"), ("POST", "/v1/sessions")];

/// The key a request asks for: `None` without the header, or on an [`ANONYMOUS_WRITES`] route.
pub fn requested_key(parts: &Parts) -> Result<Option<String>, ApiError> {
    let Some(value) = parts.headers.get(HEADER) else { return Ok(None) };
    let method = parts.method.as_str();
    if ANONYMOUS_WRITES.iter().any(|(m, p)| *m == method && *p == parts.uri.path()) {
        return Ok(None);
    }
    let key = value.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LENGTH).ok_or_else(|| {
        ApiError::bad_request("invalid-idempotency-key", "Idempotency-Key must be 1-255 visible ASCII characters")
    })?;
    Ok(Some(key.to_owned()))
}

/// A key of an authenticated request, with what identifies the request.
#[derive(Debug, Clone)]
pub struct Keyed {
    principal: String,
    key: String,
    method: String,
    path_hash: Vec<u8>,
    request_hash: Vec<u8>,
}

impl Keyed {
    pub fn new(principal: &Principal, key: String, parts: &Parts, body: &[u8]) -> Self {
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let path_hash = Sha256::digest(path.as_bytes()).to_vec();
        let mut hasher = Sha256::new();
        for piece in [method.as_bytes(), b"\n", path.as_bytes(), b"\n", body] {
            hasher.update(piece);
        }
        Self {
            principal: principal.user_id.to_string(),
            key,
            method,
            path_hash,
            request_hash: hasher.finalize().to_vec(),
        }
    }
}

/// Takes the key in `tx`, the request's unit of work. `None`: the key is the request's, go on;
/// otherwise the answer to send instead of processing the request (a replay, a 409, a 422).
pub async fn take(state: &AppState, tx: &mut sqlx::PgConnection, keyed: &Keyed) -> Result<Option<Response>, ApiError> {
    let request = KeyRequest {
        principal: &keyed.principal,
        key: &keyed.key,
        method: &keyed.method,
        path_hash: &keyed.path_hash,
        request_hash: &keyed.request_hash,
        expires_at: OffsetDateTime::now_utc() + state.config.idempotency_ttl,
        lease: state.config.request_timeout,
    };
    match idempotency::take(tx, &request).await? {
        Taken::Started => Ok(None),
        Taken::Busy => Err(ApiError::conflict(
            "idempotency-request-in-progress",
            "a request with this Idempotency-Key is still being processed",
        )),
        Taken::Existing(stored) => {
            if stored.request_hash != keyed.request_hash {
                let detail = if stored.path_hash.as_ref().is_some_and(|h| *h != keyed.path_hash) {
                    "this Idempotency-Key was already used for another endpoint"
                } else {
                    "this Idempotency-Key was already used with a different request"
                };
                return Err(ApiError::unprocessable("idempotency-key-reused", detail));
            }
            replay(&stored).map(Some)
        }
    }
}

/// Stores a successful response for the key, in `tx` (committed with the request's changes);
/// returns the response to send once that commit is made.
pub async fn store(tx: &mut sqlx::PgConnection, keyed: &Keyed, response: Response) -> Result<Response, ApiError> {
    let (mut parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| ApiError::Internal(e.into()))?;
    let mut stored_headers = serde_json::Map::new();
    for name in [axum::http::header::CONTENT_TYPE, axum::http::header::LOCATION] {
        if let Some(v) = parts.headers.get(&name).and_then(|v| v.to_str().ok()) {
            stored_headers.insert(name.as_str().to_owned(), v.into());
        }
    }
    idempotency::complete(
        tx,
        &keyed.principal,
        &keyed.key,
        parts.status.as_u16(),
        &serde_json::Value::Object(stored_headers),
        &body,
    )
    .await?;
    parts.headers.insert(HeaderName::from_static(REPLAYED), HeaderValue::from_static("false"));
    Ok(Response::from_parts(parts, Body::from(body)))
}

fn replay(stored: &StoredKey) -> Result<Response, ApiError> {
    let status = stored.status.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("replaying a key in progress")))?;
    let status = StatusCode::from_u16(status as u16).map_err(|e| ApiError::Internal(e.into()))?;
    let mut headers = HeaderMap::new();
    if let Some(serde_json::Value::Object(map)) = &stored.response_headers {
        for (name, value) in map {
            let Some(value) = value.as_str() else { continue };
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
                headers.insert(n, v);
            }
        }
    }
    headers.insert(HeaderName::from_static(REPLAYED), HeaderValue::from_static("true"));
    let body = Body::from(stored.response_body.clone().unwrap_or_default());
    Ok((status, headers, body).into_response())
}
