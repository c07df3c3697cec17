//! User search: `/v1/search/users`.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Json, Problem, Query};
use crate::routes::limit;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search_users))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// At least 2 characters.
    pub q: Option<String>,
    /// 1–50, default 20.
    pub limit: Option<u32>,
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

/// Searches active users: exact handle, then handle prefix, then name, higher score first.
#[utoipa::path(get, path = "/v1/search/users", tag = "search", security(("bearer" = [])), params(SearchParams),
    responses((status = 200, body = SearchResults), (status = 401, body = Problem), (status = 422, body = Problem)))]
async fn search_users(
    State(state): State<AppState>,
    _principal: Principal,
    Query(params): Query<SearchParams>,
) -> ApiResult<Json<SearchResults>> {
    let q = params.q.as_deref().map(str::trim).unwrap_or("");
    if q.chars().count() < 2 {
        return Err(trellis_domain::FieldError::new("q", "too_short", "must be at least 2 characters").into());
    }
    if q.chars().count() > 100 {
        return Err(trellis_domain::FieldError::new("q", "too_long", "must be at most 100 characters").into());
    }
    let limit = limit(params.limit, 20, 50)?;
    let offset: i64 = match &params.cursor {
        None => 0,
        Some(c) => trellis_store::page::decode_cursor(c)
            .filter(|o: &i64| *o >= 0)
            .ok_or_else(|| ApiError::bad_request("invalid-cursor", "the cursor is not one this list handed out"))?,
    };
    let mut hits = trellis_store::search::users(&state.pool, q, offset, limit as i64 + 1).await?;
    let next_cursor = (hits.len() > limit).then(|| trellis_store::page::encode_cursor(&(offset + limit as i64)));
    hits.truncate(limit);
    Ok(Json(SearchResults {
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
        source: "database",
    }))
}
