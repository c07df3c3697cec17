//! The moderators' queue and their decisions: `/v1/moderation/disputes`.
//!
//! A moderator never sees or decides a dispute against themselves, and only admins see and
//! decide disputes against a moderator or an admin (`trellis_domain::disputes::may_moderate`):
//! to anyone else such a dispute does not exist (404).

use axum::extract::State;
use serde::Deserialize;
use trellis_commands::disputes::{ModerateError, Moderator};
use trellis_domain::adjudication::MODERATOR_RULE;
use trellis_domain::disputes::{DisputeStatus, Priority, Verdict};
use trellis_domain::identity::Role;
use trellis_domain::{DisputeId, FieldError};
use trellis_store::disputes::{QueueKey, QueueViewer};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Json, Path, Problem, Query};
use crate::routes::{list, page};
use crate::unit_of_work::UnitOfWork;
use crate::views::{Audience, Dispute, List, PageParams};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(queue)).routes(routes!(decide))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct QueueParams {
    /// `pending`, `upheld`, `dismissed` or `needs_review`.
    pub status: Option<String>,
    /// `P0` … `P3`.
    pub priority: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Disputes by priority, then age (moderators and admins): those the caller may moderate, so
/// never one against the caller, and one against a moderator or an admin for admins only.
#[utoipa::path(get, path = "/v1/moderation/disputes", tag = "moderation", security(("bearer" = [])),
    params(QueueParams),
    responses((status = 200, body = List<Dispute>), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 422, body = Problem)))]
async fn queue(
    State(state): State<AppState>,
    principal: Principal,
    Query(params): Query<QueueParams>,
) -> ApiResult<Json<List<Dispute>>> {
    principal.require_moderator()?;
    let status = params.status.as_deref().map(DisputeStatus::parse).transpose()?;
    let priority = params.priority.as_deref().map(Priority::parse).transpose()?;
    let (limit, after) =
        page::<QueueKey>(&state, "moderation-queue", &PageParams { limit: params.limit, cursor: params.cursor })?;
    let viewer = QueueViewer { user: principal.user_id, admin: principal.role == Role::Admin };
    let rows = trellis_store::disputes::list_queue(&state.pool, viewer, status, priority, after, limit).await?;
    Ok(Json(list(&state, "moderation-queue", rows, |r| Dispute::from_row(r, Audience::Moderator))))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    /// `upheld` or `dismissed`.
    pub decision: String,
    /// Shown to the reporter with the outcome.
    pub note: String,
}

/// Decides a dispute (moderators and admins). Upholding applies the same effects as the
/// automatic rules. A dispute the caller may not moderate (against themselves, or against a
/// moderator or an admin unless the caller is an admin) answers 404; one they filed, 403.
#[utoipa::path(post, path = "/v1/moderation/disputes/{id}/decision", tag = "moderation", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = DecisionBody,
    responses((status = 200, body = Dispute), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn decide(
    principal: Principal,
    work: UnitOfWork,
    Path(id): Path<Uuid>,
    Json(body): Json<DecisionBody>,
) -> ApiResult<Json<Dispute>> {
    principal.require_moderator()?;
    let verdict = Verdict::parse(&body.decision)?;
    let note = body.note.trim();
    if note.is_empty() || note.chars().count() > 2000 {
        return Err(FieldError::new("note", "invalid", "must be 1-2000 characters").into());
    }
    let id = DisputeId(id);
    let mut tx = work.begin().await?;
    let moderator = Moderator { id: principal.user_id, role: principal.role };
    let decided =
        trellis_commands::disputes::moderate(&mut tx, moderator, id, verdict, note).await.map_err(|e| match e {
            ModerateError::NotFound => ApiError::NotFound("dispute"),
            ModerateError::OwnFiling => ApiError::Forbidden("moderators cannot decide disputes they filed"),
            ModerateError::AlreadyDecided(status) => {
                ApiError::conflict("dispute-already-decided", format!("this dispute was already {}", status.as_str()))
            }
            ModerateError::UnknownModerator => ApiError::Unauthenticated,
            ModerateError::Database(e) => e.into(),
        })?;
    let row = work.finish(tx, decided).await?;
    // The same counter as the dispute processor's rules (its series exist from the processor's
    // start-up; Prometheus sums both processes).
    let outcome = verdict.status().as_str();
    dispute_processor::instrument::DisputeDecided { dispute: id.0, status: verdict.status(), rule: MODERATOR_RULE }
        .emit();
    tracing::info!(dispute = %id, moderator = %principal.user_id, decision = outcome, "dispute decided by a moderator");
    Ok(Json(Dispute::from_row(row, Audience::Moderator)))
}
