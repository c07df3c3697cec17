//! `Idempotency-Key` for every POST, PUT, PATCH and DELETE.
//!
//! The first request with a key is processed and its response stored; a retry with the same
//! key and the same request gets the stored response (`Idempotent-Replayed: true`); the same
//! key with another request is a 422; a retry while the first is still running is a 409.
//! Server errors are not stored, so the client can retry them. Keys are scoped to the bearer
//! token (or to anonymous callers) and expire after `IDEMPOTENCY_TTL`.
//!
//! Bearer tokens are never stored: a response that issued one ([`TokenIssued`]) is stored
//! without it, and its replay issues a fresh token for the same user.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use trellis_domain::UserId;
use trellis_store::idempotency::{self, Begin};

use crate::app::AppState;
use crate::auth;
use crate::error::ApiError;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";
const REISSUE_TOKEN_FOR: &str = "x-trellis-reissue-token-for";

/// Put in a response's extensions by handlers whose body has a `token` field.
#[derive(Debug, Clone, Copy)]
pub struct TokenIssued(pub UserId);

pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE) {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get(HEADER) else {
        return next.run(request).await;
    };
    match with_key(&state, key.clone(), request, next).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn with_key(state: &AppState, key: HeaderValue, request: Request, next: Next) -> Result<Response, ApiError> {
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::bad_request("invalid-idempotency-key", "Idempotency-Key must be 1-255 visible ASCII characters")
        })?
        .to_owned();
    let (parts, body) = request.into_parts();
    let body =
        axum::body::to_bytes(body, state.config.body_limit_bytes).await.map_err(|_| ApiError::PayloadTooLarge)?;
    let principal = match auth::bearer_from_headers(&parts.headers) {
        Some(token) => hex::encode(auth::hash_token(token)),
        None => "anonymous".to_owned(),
    };
    let method = parts.method.as_str().to_owned();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    let mut hasher = Sha256::new();
    for piece in [method.as_bytes(), b"\n", path.as_bytes(), b"\n", &body] {
        hasher.update(piece);
    }
    let request_hash = hasher.finalize().to_vec();
    let expires_at = OffsetDateTime::now_utc() + state.config.idempotency_ttl;

    match idempotency::begin(&state.pool, &principal, &key, &method, &path, &request_hash, expires_at).await? {
        Begin::Existing(stored) => {
            if stored.request_hash != request_hash {
                return Err(ApiError::unprocessable(
                    "idempotency-key-reused",
                    "this Idempotency-Key was already used with a different request",
                ));
            }
            match stored.status {
                None => Err(ApiError::conflict(
                    "idempotency-request-in-progress",
                    "a request with this Idempotency-Key is still being processed",
                )),
                Some(status) => replay(state, status, stored.response_headers, stored.response_body).await,
            }
        }
        Begin::Started => {
            // Cut off before its response is stored (the request timeout, a client that went
            // away), the request releases its key instead of holding it "in progress" until it
            // expires.
            let mut release = ReleaseOnDrop(Some((state.pool.clone(), principal.clone(), key.clone())));
            let response = next.run(Request::from_parts(parts, Body::from(body))).await;
            if response.status().is_server_error() {
                release.0 = None;
                idempotency::abandon(&state.pool, &principal, &key).await?;
                return Ok(response);
            }
            let (mut parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| ApiError::Internal(e.into()))?;
            let mut stored_headers = serde_json::Map::new();
            for name in [axum::http::header::CONTENT_TYPE, axum::http::header::LOCATION] {
                if let Some(v) = parts.headers.get(&name).and_then(|v| v.to_str().ok()) {
                    stored_headers.insert(name.as_str().to_owned(), v.into());
                }
            }
            let mut stored_body = bytes.to_vec();
            if let Some(TokenIssued(user)) = parts.extensions.get::<TokenIssued>().copied() {
                stored_headers.insert(REISSUE_TOKEN_FOR.into(), user.to_string().into());
                stored_body = without_token(&bytes)?;
            }
            idempotency::complete(
                &state.pool,
                &principal,
                &key,
                parts.status.as_u16(),
                &serde_json::Value::Object(stored_headers),
                &stored_body,
            )
            .await?;
            release.0 = None;
            parts.headers.insert(HeaderName::from_static(REPLAYED), HeaderValue::from_static("false"));
            Ok(Response::from_parts(parts, Body::from(bytes)))
        }
    }
}

/// Abandons a started key when dropped while still armed.
struct ReleaseOnDrop(Option<(sqlx::PgPool, String, String)>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some((pool, principal, key)) = self.0.take() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = idempotency::abandon(&pool, &principal, &key).await {
                    tracing::warn!(error = %e, "releasing the Idempotency-Key of a cut-off request failed");
                }
            });
        }
    }
}

async fn replay(
    state: &AppState,
    status: i16,
    headers: Option<serde_json::Value>,
    body: Option<Vec<u8>>,
) -> Result<Response, ApiError> {
    let status = StatusCode::from_u16(status as u16).map_err(|e| ApiError::Internal(e.into()))?;
    let mut header_map = HeaderMap::new();
    let mut reissue_for = None;
    if let Some(serde_json::Value::Object(map)) = headers {
        for (name, value) in map {
            let Some(value) = value.as_str() else { continue };
            if name == REISSUE_TOKEN_FOR {
                reissue_for = value.parse::<UserId>().ok();
            } else if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
                header_map.insert(n, v);
            }
        }
    }
    let mut body = body.unwrap_or_default();
    if let Some(user) = reissue_for {
        let issued = auth::issue_token(&state.pool, user, state.config.token_ttl).await?;
        body = with_token(&body, &issued)?;
    }
    header_map.insert(HeaderName::from_static(REPLAYED), HeaderValue::from_static("true"));
    Ok((status, header_map, Bytes::from(body)).into_response())
}

fn without_token(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut json: serde_json::Value = serde_json::from_slice(body).map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(obj) = json.as_object_mut() {
        obj.remove("token");
        obj.remove("expires_at");
    }
    serde_json::to_vec(&json).map_err(|e| ApiError::Internal(e.into()))
}

fn with_token(body: &[u8], issued: &auth::IssuedToken) -> Result<Vec<u8>, ApiError> {
    let mut json: serde_json::Value = serde_json::from_slice(body).map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("token".into(), issued.token.clone().into());
        let expires = issued
            .expires_at
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| ApiError::Internal(e.into()))?;
        obj.insert("expires_at".into(), expires.into());
    }
    serde_json::to_vec(&json).map_err(|e| ApiError::Internal(e.into()))
}
