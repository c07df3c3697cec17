//! Search: `/v1/search/users` and `/v1/me/contacts/search`.
//!
//! Both answer from the search read model (`"source": "index"`) while the projection is fresh,
//! and from the base tables (`"source": "database"`, header `x-search-source: database`,
//! `trellis_search_fallbacks_total`) while it lags more than `SEARCH_MAX_LAG` behind the
//! newest event or is empty while users exist.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::BearerToken;
use crate::error::{ApiError, ApiResult, Json, Problem, Query};
use crate::read_replicas::{ReadDb, Reader};
use crate::routes::{limit, open_cursor};
use trellis_store::page::Cursor;
use trellis_store::search::Documents;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search_users)).routes(routes!(search_contacts))
}

/// Where search answers from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchSource {
    Index,
    Database,
}

impl SearchSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SearchSource::Index => "index",
            SearchSource::Database => "database",
        }
    }
}

/// The last freshness decision, reused for a second so that search does not pay for it on
/// every request.
#[derive(Default)]
pub struct SearchSourceCache(std::sync::Mutex<Option<(std::time::Instant, SearchSource)>>);

const SOURCE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The values of `trellis_search_fallbacks_total{endpoint}`.
pub const ENDPOINTS: [&str; 2] = ["users", "contacts"];

async fn source(state: &AppState, endpoint: &'static str) -> Result<SearchSource, ApiError> {
    let cached = *state.search_source.0.lock().expect("source cache lock");
    let source = match cached {
        Some((at, source)) if at.elapsed() < SOURCE_TTL => source,
        _ => {
            let freshness = trellis_store::search::freshness(&state.pool).await?;
            let source = if freshness.index_usable(state.config.search_max_lag) {
                SearchSource::Index
            } else {
                SearchSource::Database
            };
            *state.search_source.0.lock().expect("source cache lock") = Some((std::time::Instant::now(), source));
            source
        }
    };
    if source == SearchSource::Database {
        crate::instrument::SearchFellBack { endpoint }.emit();
    }
    Ok(source)
}

fn with_source<T: IntoResponse>(source: SearchSource, body: T) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert("x-search-source", axum::http::HeaderValue::from_static(source.as_str()));
    response
}

fn query_text(q: Option<&str>) -> Result<String, ApiError> {
    let q = q.map(str::trim).unwrap_or("");
    if q.chars().count() < 2 {
        return Err(trellis_domain::FieldError::new("q", "too_short", "must be at least 2 characters").into());
    }
    if q.chars().count() > 100 {
        return Err(trellis_domain::FieldError::new("q", "too_long", "must be at most 100 characters").into());
    }
    Ok(q.to_owned())
}

/// Results a search pages through at most: every tier reads `offset + limit` rows, so the
/// offset is what bounds a search's cost. Past it the results end (`next_cursor` is null);
/// a narrower query finds the rest.
pub const MAX_RESULTS: i64 = 1000;

/// The offset in a search cursor: a sealed cursor this list handed out (400 otherwise), within
/// [`MAX_RESULTS`] (422 otherwise: a cursor sealed before the cap was lowered).
fn offset_of(state: &AppState, list: &'static str, cursor: Option<&str>) -> Result<i64, ApiError> {
    let Some(cursor) = cursor else { return Ok(0) };
    let offset: i64 = open_cursor(state, list, cursor)?;
    if !(0..MAX_RESULTS).contains(&offset) {
        return Err(ApiError::unprocessable(
            "cursor-out-of-range",
            format!("search pages reach the first {MAX_RESULTS} results at most; narrow the query"),
        ));
    }
    Ok(offset)
}

/// The cursor of the page after `offset`, if there are more results within [`MAX_RESULTS`].
fn next_cursor(state: &AppState, list: &'static str, more: bool, offset: i64, limit: usize) -> Option<String> {
    let next = offset + limit as i64;
    (more && next < MAX_RESULTS).then(|| state.cursor_key.seal(list, &Cursor::of(&next)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// At least 2 characters.
    pub q: Option<String>,
    /// 1–50, default 20.
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page of the same search. Cursors are sealed (any other
    /// string is a 400), and pages reach the first 1,000 results at most.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserHit {
    pub id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub verified: bool,
    pub score: Option<i32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResults {
    pub items: Vec<UserHit>,
    pub next_cursor: Option<String>,
    /// Where the results came from: `database` (the base tables) or `index` (the read model).
    pub source: &'static str,
}

/// Searches active users: exact handle, then handle prefix, then name (one typo tolerated from
/// 3 characters), higher score first among equals.
#[utoipa::path(get, path = "/v1/search/users", tag = "search", security(("bearer" = [])), params(SearchParams),
    responses((status = 200, body = SearchResults), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem)))]
async fn search_users(
    State(state): State<AppState>,
    token: BearerToken,
    mut db: ReadDb,
    Query(params): Query<SearchParams>,
) -> ApiResult<Response> {
    let q = query_text(params.q.as_deref())?;
    let limit = limit(params.limit, 20, 50)?;
    let offset = offset_of(&state, "search-users", params.cursor.as_deref())?;
    // The last page within the cap is cut short rather than crossing it.
    let limit = limit.min((MAX_RESULTS - offset) as usize);
    let source = source(&state, "users").await?;
    let mut hits = match source {
        // The common case: one statement, authentication included.
        SearchSource::Index => {
            let idle = state.config.token_idle_timeout;
            let need = limit as i64 + 1;
            let mut found = indexed_users(db.pool(), &token, idle, &q, offset, need).await?;
            if found.is_none() && db.on_replica() {
                db.confirm_on_primary();
                found = indexed_users(db.pool(), &token, idle, &q, offset, need).await?;
            }
            let hits = found.ok_or(ApiError::Unauthenticated)?;
            state.activity.saw(token.hash);
            hits
        }
        SearchSource::Database => {
            let reader = Reader::authenticate(db, &state, Some(token.hash)).await?;
            trellis_store::search::users(reader.pool(), Documents::Base, &q, offset, limit as i64 + 1).await?
        }
    };
    let next_cursor = next_cursor(&state, "search-users", hits.len() > limit, offset, limit);
    hits.truncate(limit);
    let body = SearchResults {
        items: hits
            .into_iter()
            .map(|h| UserHit {
                id: h.id,
                handle: h.handle,
                display_name: h.display_name,
                verified: h.verified,
                score: h.score,
            })
            .collect(),
        next_cursor,
        source: source.as_str(),
    };
    Ok(with_source(source, Json(body)))
}

/// The read model's hits for `q`, and the caller, in one statement; `None` when the token does
/// not authenticate.
async fn indexed_users(
    pool: &sqlx::PgPool,
    token: &BearerToken,
    idle: std::time::Duration,
    q: &str,
    offset: i64,
    limit: i64,
) -> Result<Option<Vec<trellis_store::search::UserHit>>, sqlx::Error> {
    let found = trellis_store::search::indexed_users_for_token(
        pool,
        &token.hash,
        idle,
        q,
        offset,
        limit,
        trellis_store::search::HANDLE_RANGE_CAP,
    )
    .await?;
    Ok(found.map(|(_, hits)| hits))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContactHit {
    pub user_id: Uuid,
    pub handle: String,
    pub display_name: String,
    pub label: String,
    /// Names of the caller's circles this contact is in.
    pub circles: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContactResults {
    pub items: Vec<ContactHit>,
    pub next_cursor: Option<String>,
    /// `index` or `database`.
    pub source: &'static str,
}

/// Searches the caller's own contacts by handle, name, label or circle name.
#[utoipa::path(get, path = "/v1/me/contacts/search", tag = "search", security(("bearer" = [])), params(SearchParams),
    responses((status = 200, body = ContactResults), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 422, body = Problem)))]
async fn search_contacts(
    State(state): State<AppState>,
    reader: Reader,
    Query(params): Query<SearchParams>,
) -> ApiResult<Response> {
    let q = query_text(params.q.as_deref())?;
    let limit = limit(params.limit, 20, 50)?;
    let offset = offset_of(&state, "search-contacts", params.cursor.as_deref())?;
    let limit = limit.min((MAX_RESULTS - offset) as usize);
    let source = source(&state, "contacts").await?;
    let owner = reader.principal.user_id.0;
    let mut hits = match source {
        SearchSource::Index => {
            trellis_store::search::index_contacts(reader.pool(), owner, &q, offset, limit as i64 + 1).await?
        }
        SearchSource::Database => {
            trellis_store::search::contacts(reader.pool(), owner, &q, offset, limit as i64 + 1).await?
        }
    };
    let next_cursor = next_cursor(&state, "search-contacts", hits.len() > limit, offset, limit);
    hits.truncate(limit);
    let body = ContactResults {
        items: hits
            .into_iter()
            .map(|h| ContactHit {
                user_id: h.contact_id,
                handle: h.handle,
                display_name: h.display_name,
                label: h.label,
                circles: h.circles,
            })
            .collect(),
        next_cursor,
        source: source.as_str(),
    };
    Ok(with_source(source, Json(body)))
}
