//! Disputes filed by the caller: `/v1/disputes`, `/v1/me/disputes`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use trellis_commands::disputes::{FileError, Filing, FilingLimits};
use trellis_domain::disputes::{Description, DisputeKind, may_moderate};
use trellis_domain::{DisputeId, FieldError, UserId, ValidationErrors};
use trellis_store::disputes::DisputeRow;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Json, Path, Problem, Query};
use crate::routes::{list, page, resolve_user};
use crate::unit_of_work::UnitOfWork;
use crate::views::{Audience, Dispute, List, PageParams};

/// The `Retry-After` of `open-dispute-limit`: a hint, as the allowance comes back when a
/// dispute is decided (automatic decisions take seconds; reviews take longer).
const OPEN_LIMIT_RETRY_SECS: u64 = 300;

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
///
/// Any signed-in user may file. Limits: a reporter may have at most `DISPUTE_OPEN_LIMIT`
/// (default 20) open disputes (pending or needs review), of which at most
/// `DISPUTE_OPEN_LIMIT_P0` (default 3) at P0; filing beyond either is answered 429
/// `open-dispute-limit` with `Retry-After` (a hint: the allowance comes back as the reporter's
/// open disputes are decided). A P0 dispute (impersonation) jumps every queue and can suspend
/// its target, so the reporter's account must be at least `DISPUTE_P0_MIN_ACCOUNT_AGE` old
/// (default 24 h); a younger account is answered 422 `account-too-new`.
#[utoipa::path(post, path = "/v1/disputes", tag = "disputes", security(("bearer" = [])), request_body = DisputeBody,
    responses((status = 201, body = Dispute), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
async fn file_dispute(
    State(state): State<AppState>,
    principal: Principal,
    work: UnitOfWork,
    Json(body): Json<DisputeBody>,
) -> ApiResult<Response> {
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
    // The reporter's concurrent filings queue here, holding no database connection; the
    // advisory lock in the transaction then serialises them across replicas.
    let _one_filing_at_a_time = state.filings.lock(principal.user_id).await;
    let mut tx = work.begin().await?;
    let target = resolve_user(&mut *tx, &body.target_id).await?;
    let id = DisputeId::new();
    let filing = Filing {
        id,
        reporter: principal.user_id,
        target: UserId(target.id),
        kind,
        description: &description,
        evidence,
    };
    let limits = FilingLimits {
        open: state.config.dispute_open_limit,
        open_p0: state.config.dispute_open_limit_p0,
        p0_min_account_age: state.config.dispute_p0_min_account_age,
    };
    let filed = trellis_commands::disputes::file(&mut tx, &filing, &limits).await.map_err(|e| match e {
        FileError::AgainstSelf => ApiError::unprocessable("self-dispute", "you cannot file a dispute against yourself"),
        FileError::UnknownReporter => ApiError::Unauthenticated,
        FileError::AccountTooNew(min_age) => ApiError::unprocessable(
            "account-too-new",
            format!(
                "an account must be at least {} old to file an impersonation (P0) dispute",
                humantime::format_duration(min_age)
            ),
        ),
        FileError::OpenLimit { open, p0 } => ApiError::QuotaExceeded {
            slug: "open-dispute-limit",
            detail: format!(
                "you have {open} open {}disputes, the most one reporter may have; file again when one is decided",
                if p0 { "P0 " } else { "" }
            ),
            retry_after_secs: OPEN_LIMIT_RETRY_SECS,
        },
        FileError::Database(e) => e.into(),
    })?;
    let row = work.finish(tx, filed).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/disputes/{id}"))],
        Json(Dispute::from_row(row, Audience::Reporter)),
    )
        .into_response())
}

/// A dispute: for a moderator or an admin who may moderate it, everything; for its reporter,
/// the outcome in generic words (never the counts that decided it). Anyone else gets 404, and
/// so does a moderator for a dispute against themselves or, unless they are an admin, against
/// another moderator or an admin (`trellis_domain::disputes::may_moderate`).
#[utoipa::path(get, path = "/v1/disputes/{id}", tag = "disputes", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Dispute), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn get_dispute(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Dispute>> {
    let row = trellis_store::disputes::get(&state.pool, DisputeId(id)).await?.ok_or(ApiError::NotFound("dispute"))?;
    let audience = audience(&state, &principal, &row).await?.ok_or(ApiError::NotFound("dispute"))?;
    Ok(Json(Dispute::from_row(row, audience)))
}

/// How `principal` may see a dispute: as a moderator (the target's role as it is now), as its
/// reporter, or not at all.
async fn audience(state: &AppState, principal: &Principal, row: &DisputeRow) -> ApiResult<Option<Audience>> {
    if principal.role.can_moderate() && row.target_id != principal.user_id.0 {
        let target = trellis_store::identity::find_by_id(&state.pool, UserId(row.target_id))
            .await?
            .ok_or(ApiError::NotFound("dispute"))?;
        if may_moderate(principal.user_id, principal.role, UserId(row.target_id), target.role) {
            return Ok(Some(Audience::Moderator));
        }
    }
    Ok((row.reporter_id == principal.user_id.0).then_some(Audience::Reporter))
}

/// Disputes the caller filed, newest first, each as its reporter sees it.
#[utoipa::path(get, path = "/v1/me/disputes", tag = "disputes", security(("bearer" = [])), params(PageParams),
    responses((status = 200, body = List<Dispute>), (status = 401, body = Problem)))]
async fn my_disputes(
    State(state): State<AppState>,
    principal: Principal,
    Query(params): Query<PageParams>,
) -> ApiResult<Json<List<Dispute>>> {
    let (limit, before) = page::<Uuid>(&state, "my-disputes", &params)?;
    let rows = trellis_store::disputes::list_by_reporter(&state.pool, principal.user_id, before, limit).await?;
    Ok(Json(list(&state, "my-disputes", rows, |r| Dispute::from_row(r, Audience::Reporter))))
}
