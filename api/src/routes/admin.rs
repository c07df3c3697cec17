//! Administration: `/v1/admin/...` (admin role).

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use trellis_domain::events::{EventPayload, ScoreRunRequested};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiResult, Json, Problem};
use crate::routes::events;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(request_score_run))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScoreRunRequest {
    /// The `events.scores.run_requested` event that carries the request.
    pub event_id: Uuid,
    /// Requests that arrive during a run are served together by one follow-up run.
    pub status: &'static str,
}

/// Requests a trust-score run (admins). The score orchestrator picks it up from the event.
#[utoipa::path(post, path = "/v1/admin/score-runs", tag = "admin", security(("bearer" = [])),
    responses((status = 202, body = ScoreRunRequest), (status = 401, body = Problem), (status = 403, body = Problem)))]
async fn request_score_run(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<(StatusCode, Json<ScoreRunRequest>)> {
    principal.require_admin()?;
    let evs = events(
        Some(principal.user_id),
        [EventPayload::ScoreRunRequested(ScoreRunRequested {
            requested_by: Some(principal.user_id),
            reason: "POST /v1/admin/score-runs".into(),
        })],
    );
    let mut conn = state.pool.acquire().await?;
    trellis_store::outbox::insert(&mut conn, &evs).await?;
    Ok((StatusCode::ACCEPTED, Json(ScoreRunRequest { event_id: evs[0].envelope.id.0, status: "requested" })))
}
