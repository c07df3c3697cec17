//! Disputes filed by the caller: `/v1/disputes`, `/v1/me/disputes`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use trellis_domain::disputes::{Description, DisputeKind};
use trellis_domain::events::{DisputeFiled, EventPayload};
use trellis_domain::{DisputeId, FieldError, UserId, ValidationErrors};
use trellis_store::disputes::NewDispute;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Json, Path, Problem, Query};
use crate::routes::{events, page, resolve_user};
use crate::unit_of_work::UnitOfWork;
use crate::views::{Dispute, List, PageParams};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(file_dispute)).routes(routes!(get_dispute)).routes(routes!(my_disputes))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisputeBody {
    /// The user disputed: id or handle.
    pub target_id: String,
    /// `impersonation` (P0), `harassment` (P1), `spam` (P2) or `incorrect_info` (P3).
    pub kind: String,
    pub description: String,
    /// Links or text backing the dispute, up to 2,000 characters.
    pub evidence: Option<String>,
}

/// Files a dispute; its priority follows from its kind.
#[utoipa::path(post, path = "/v1/disputes", tag = "disputes", security(("bearer" = [])), request_body = DisputeBody,
    responses((status = 201, body = Dispute), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 422, body = Problem)))]
async fn file_dispute(principal: Principal, work: UnitOfWork, Json(body): Json<DisputeBody>) -> ApiResult<Response> {
    let mut errors = ValidationErrors::default();
    let kind = errors.check(DisputeKind::parse(&body.kind));
    let description = errors.check(Description::parse(&body.description));
    let evidence = body.evidence.as_deref().map(str::trim).filter(|e| !e.is_empty());
    if evidence.is_some_and(|e| e.chars().count() > 2000) {
        errors.0.push(FieldError::new("evidence", "too_long", "must be at most 2000 characters"));
    }
    let (Some(kind), Some(description)) = (kind, description) else {
        return Err(errors.into());
    };
    errors.into_result()?;
    let mut tx = work.begin().await?;
    let target = resolve_user(&mut *tx, &body.target_id).await?;
    let target_id = UserId(target.id);
    if target_id == principal.user_id {
        return Err(ApiError::unprocessable("self-dispute", "you cannot file a dispute against yourself"));
    }
    let id = DisputeId::new();
    let row = trellis_store::disputes::insert(
        &mut tx,
        &NewDispute {
            id,
            reporter: principal.user_id,
            target: target_id,
            kind,
            description: description.as_str(),
            evidence,
        },
    )
    .await?;
    let ev = EventPayload::DisputeFiled(DisputeFiled {
        dispute_id: id,
        reporter_id: principal.user_id,
        target_id,
        kind,
        priority: kind.priority(),
    });
    trellis_store::outbox::insert(&mut tx, &events(Some(principal.user_id), [ev])).await?;
    work.finish(tx);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/disputes/{id}"))],
        Json(Dispute::from_row(row, principal.role.can_moderate())),
    )
        .into_response())
}

/// A dispute, for its reporter and for moderators (anyone else gets 404).
#[utoipa::path(get, path = "/v1/disputes/{id}", tag = "disputes", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Dispute), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn get_dispute(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Dispute>> {
    let row = trellis_store::disputes::get(&state.pool, DisputeId(id)).await?.ok_or(ApiError::NotFound("dispute"))?;
    let moderator = principal.role.can_moderate();
    if row.reporter_id != principal.user_id.0 && !moderator {
        return Err(ApiError::NotFound("dispute"));
    }
    Ok(Json(Dispute::from_row(row, moderator)))
}

/// Disputes the caller filed, newest first.
#[utoipa::path(get, path = "/v1/me/disputes", tag = "disputes", security(("bearer" = [])), params(PageParams),
    responses((status = 200, body = List<Dispute>), (status = 401, body = Problem)))]
async fn my_disputes(
    State(state): State<AppState>,
    principal: Principal,
    Query(params): Query<PageParams>,
) -> ApiResult<Json<List<Dispute>>> {
    let (limit, before) = page::<Uuid>(&params)?;
    let rows = trellis_store::disputes::list_by_reporter(&state.pool, principal.user_id, before, limit).await?;
    let moderator = principal.role.can_moderate();
    Ok(Json(List::from_page(rows, |r| Dispute::from_row(r, moderator))))
}
