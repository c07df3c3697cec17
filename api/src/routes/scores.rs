//! Trust scores: `/v1/users/{user}/score`.

use axum::extract::State;
use serde::Serialize;
use time::OffsetDateTime;
use trellis_domain::UserId;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::error::{ApiResult, Json, Path, Problem};
use crate::read_replicas::Reader;
use crate::routes::resolve_user;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_score))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Score {
    pub user_id: Uuid,
    /// `scored`, or `not_yet_scored` before the first run that included this user.
    pub status: &'static str,
    /// 0–1000: the share of active users with a lower trust.
    pub score: Option<i32>,
    /// The user's EigenTrust value; all users' values sum to 1.
    pub trust: Option<f64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub computed_at: Option<OffsetDateTime>,
    /// True once the score is older than the staleness threshold (24 h by default).
    pub stale: bool,
}

/// A user's trust score.
#[utoipa::path(get, path = "/v1/users/{user}/score", tag = "scores", security(("bearer" = [])),
    params(("user" = String, Path, description = "user id or handle")),
    responses((status = 200, body = Score), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn get_score(State(state): State<AppState>, reader: Reader, Path(user): Path<String>) -> ApiResult<Json<Score>> {
    let user = resolve_user(reader.pool(), &user).await?;
    let found = trellis_store::scores::get(reader.pool(), UserId(user.id)).await?;
    Ok(Json(match found {
        Some(s) => {
            let stale = OffsetDateTime::now_utc() - s.computed_at > state.config.score_stale_after;
            Score {
                user_id: user.id,
                status: "scored",
                score: Some(s.score),
                trust: Some(s.trust),
                computed_at: Some(s.computed_at),
                stale,
            }
        }
        None => Score {
            user_id: user.id,
            status: "not_yet_scored",
            score: None,
            trust: None,
            computed_at: None,
            stale: false,
        },
    }))
}
