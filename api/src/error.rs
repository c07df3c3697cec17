//! The one error type at the HTTP boundary, rendered as RFC 9457 problem details.
//!
//! Client errors carry what the client needs; server errors are opaque to the client and
//! logged with their cause by the middleware that sees the response.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use trellis_domain::{FieldError, ValidationErrors};
use utoipa::ToSchema;

/// `application/problem+json`.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// Stable identifier of the kind of problem, `urn:trellis:problem:<slug>`.
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Per-field validation errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ProblemField>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemField {
    pub field: String,
    pub code: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed: {0}")]
    Validation(ValidationErrors),
    #[error("{detail}")]
    BadRequest { slug: &'static str, detail: String },
    #[error("authentication required")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{detail}")]
    Conflict { slug: &'static str, detail: String },
    #[error("{detail}")]
    Unprocessable { slug: &'static str, detail: String },
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("too many requests")]
    RateLimited { retry_after_secs: u64 },
    /// A quota other than a request rate (open disputes): 429 with its own slug.
    #[error("{detail}")]
    QuotaExceeded { slug: &'static str, detail: String, retry_after_secs: u64 },
    /// Load shedding: the server is at capacity (connections, requests in flight, password
    /// hashing) and answers at once instead of queueing.
    #[error("the server is at capacity")]
    Overloaded { retry_after_secs: u64 },
    #[error("service unavailable: {cause}")]
    Unavailable { cause: String },
    /// A database connection was lost before anything was committed: answered like
    /// [`ApiError::Unavailable`], and the unit of work runs the request again on another one.
    #[error("database connection lost: {cause}")]
    ConnectionLost { cause: String },
    /// The connection was lost while a transaction committed, so whether the change was made is
    /// unknown: a 500 that does not invite a blind retry.
    #[error("the outcome of a commit is unknown: {cause}")]
    OutcomeUnknown { cause: String },
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn bad_request(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::BadRequest { slug, detail: detail.into() }
    }

    pub fn conflict(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::Conflict { slug, detail: detail.into() }
    }

    pub fn unprocessable(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::Unprocessable { slug, detail: detail.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } | ApiError::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } | ApiError::Overloaded { .. } | ApiError::ConnectionLost { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) | ApiError::OutcomeUnknown { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::Validation(_) => "validation",
            ApiError::BadRequest { slug, .. }
            | ApiError::Conflict { slug, .. }
            | ApiError::Unprocessable { slug, .. }
            | ApiError::QuotaExceeded { slug, .. } => slug,
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::PayloadTooLarge => "payload-too-large",
            ApiError::RateLimited { .. } => "rate-limited",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Unavailable { .. } | ApiError::ConnectionLost { .. } => "unavailable",
            ApiError::OutcomeUnknown { .. } => "outcome-unknown",
            ApiError::Internal(_) => "internal",
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            ApiError::Validation(_) => Some("the request has invalid fields".into()),
            ApiError::Unavailable { .. } | ApiError::ConnectionLost { .. } => {
                Some("a backing service is unavailable or too slow; retry after the indicated delay".into())
            }
            ApiError::Overloaded { .. } => Some("the server is at capacity; retry after the indicated delay".into()),
            ApiError::OutcomeUnknown { .. } => Some(
                "the change may or may not have been made: repeat it with the same Idempotency-Key, which answers \
                 what happened, or read the resource before sending it again"
                    .into(),
            ),
            // Server-side causes stay in the logs.
            ApiError::Internal(_) => None,
            other => Some(other.to_string()),
        }
    }
}

/// Builds a problem response from its parts; used for errors raised outside handlers too.
pub fn problem_response(status: StatusCode, slug: &str, detail: Option<String>, errors: Vec<ProblemField>) -> Response {
    let problem = Problem {
        problem_type: format!("urn:trellis:problem:{slug}"),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail,
        errors,
    };
    let body = serde_json::to_vec(&problem).expect("problems always serialise");
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))], body).into_response()
}

/// Marks a response as carrying a server-side error whose cause must be logged.
#[derive(Clone)]
pub struct ErrorCause(pub std::sync::Arc<String>);

/// Marks a response as failed on a lost database connection before anything was committed:
/// the unit of work may run the request again.
#[derive(Debug, Clone, Copy)]
pub struct LostConnection;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let errors = match &self {
            ApiError::Validation(v) => {
                v.0.iter()
                    .map(|e| ProblemField { field: e.field.into(), code: e.code.into(), message: e.message.clone() })
                    .collect()
            }
            _ => Vec::new(),
        };
        let mut response = problem_response(status, self.slug(), self.detail(), errors);
        match &self {
            ApiError::RateLimited { retry_after_secs }
            | ApiError::QuotaExceeded { retry_after_secs, .. }
            | ApiError::Overloaded { retry_after_secs } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Unavailable { .. } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            ApiError::ConnectionLost { .. } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
                response.extensions_mut().insert(LostConnection);
            }
            ApiError::Unauthenticated => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        // Shed load is counted (`trellis_api_requests_shed_total`), not logged: under a flood
        // a log line per refusal would be a flood of its own.
        if status.is_server_error() && !matches!(self, ApiError::Overloaded { .. }) {
            response.extensions_mut().insert(ErrorCause(std::sync::Arc::new(self.to_string())));
        }
        response
    }
}

impl From<ValidationErrors> for ApiError {
    fn from(v: ValidationErrors) -> Self {
        ApiError::Validation(v)
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Validation(e.into())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if trellis_store::is_connection_lost(&e) {
            ApiError::ConnectionLost { cause: e.to_string() }
        } else if trellis_store::is_unavailable(&e) {
            ApiError::Unavailable { cause: e.to_string() }
        } else {
            ApiError::Internal(e.into())
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            JsonRejection::JsonSyntaxError(e) => ApiError::bad_request("malformed-json", e.body_text()),
            JsonRejection::JsonDataError(e) => {
                ApiError::Validation(FieldError::new("body", "invalid", e.body_text()).into())
            }
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge
            }
            other => ApiError::bad_request("unreadable-body", other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request("invalid-path", r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request("invalid-query", r.body_text())
    }
}

/// `axum::Json` whose rejections are problems.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query` whose rejections are problems.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// `axum::extract::Path` whose rejections are problems.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

pub type ApiResult<T> = Result<T, ApiError>;
