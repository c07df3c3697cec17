//! Administration: `/v1/admin/...` (admin role).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use trellis_commands::Emitted;
use trellis_commands::users::AdminError;
use trellis_domain::flags::{Executor, Flag};
use trellis_domain::identity::AdminReason;
use trellis_domain::{FieldError, UserId, ValidationErrors};
use trellis_store::cutover::flags::{AuditRow, Change, FlagRow, SetError};
use trellis_store::user_admin;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Json, Path, Problem, Query};
use crate::routes::{limit, resolve_user};
use crate::unit_of_work::UnitOfWork;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(request_score_run))
        .routes(routes!(list_flags))
        .routes(routes!(set_flag))
        .routes(routes!(flag_history))
        .routes(routes!(reinstate_user))
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
async fn request_score_run(principal: Principal, work: UnitOfWork) -> ApiResult<(StatusCode, Json<ScoreRunRequest>)> {
    principal.require_admin()?;
    let requested = trellis_commands::scores::request_run(
        Some(principal.user_id),
        "POST /v1/admin/score-runs",
        OffsetDateTime::now_utc(),
    );
    let tx = work.begin().await?;
    let event_id = work.finish(tx, requested).await?;
    Ok((StatusCode::ACCEPTED, Json(ScoreRunRequest { event_id: event_id.0, status: "requested" })))
}

/// A cutover flag: which side executes a processor.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlagView {
    /// `score.executor`, `search.executor` or `dispute.executor`.
    pub name: &'static str,
    /// `monolith`, `worker` or `shadow`.
    pub value: &'static str,
    /// The value before the last change (in `shadow`, the primary); null if never changed.
    pub previous: Option<&'static str>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub updated_by: String,
}

impl From<FlagRow> for FlagView {
    fn from(r: FlagRow) -> Self {
        Self {
            name: r.flag.as_str(),
            value: r.value.as_str(),
            previous: r.previous.map(Executor::as_str),
            updated_at: r.updated_at,
            updated_by: r.updated_by,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FlagList {
    pub items: Vec<FlagView>,
}

/// The cutover flags (admins).
#[utoipa::path(get, path = "/v1/admin/flags", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = FlagList), (status = 401, body = Problem), (status = 403, body = Problem)))]
async fn list_flags(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<FlagList>> {
    principal.require_admin()?;
    let rows = trellis_store::cutover::flags::list(&state.pool).await?;
    Ok(Json(FlagList { items: rows.into_iter().map(FlagView::from).collect() }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlagChangeBody {
    /// `monolith`, `worker` or `shadow`.
    pub value: String,
    /// Why; recorded in the audit with the admin's handle.
    pub reason: String,
    /// Promote the worker even though the promotion gate refuses (recorded as forced).
    #[serde(default)]
    pub force: bool,
}

/// What a change did; `from` equals `to` when the flag already had the value (nothing is
/// recorded then).
#[derive(Debug, Serialize, ToSchema)]
pub struct FlagChanged {
    pub name: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    /// Why the promotion gate refused the change that `force` pushed through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forced_past: Option<String>,
}

/// Changes a cutover flag (admins); every change is audited (who, when, from, to, why).
#[utoipa::path(put, path = "/v1/admin/flags/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "`score.executor`, `search.executor` or `dispute.executor`")),
    request_body = FlagChangeBody,
    responses((status = 200, body = FlagChanged), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem, description = "the promotion gate refused"),
        (status = 422, body = Problem)))]
async fn set_flag(
    State(state): State<AppState>,
    principal: Principal,
    work: UnitOfWork,
    Path(name): Path<String>,
    body: Result<Json<FlagChangeBody>, ApiError>,
) -> ApiResult<Json<FlagChanged>> {
    // The role is checked before the name and the body: callers without it learn nothing else.
    principal.require_admin()?;
    let flag = Flag::parse(&name).map_err(|_| ApiError::NotFound("flag"))?;
    let Json(body) = body?;
    let mut errors = ValidationErrors::default();
    let value = errors.check(Executor::parse(&body.value));
    let reason = Some(body.reason.trim()).filter(|r| !r.is_empty());
    if reason.is_none() {
        errors.0.push(FieldError::new("reason", "required", "say why the flag changes"));
    }
    let (Some(value), Some(reason)) = (value, reason) else {
        return Err(errors.into());
    };
    let policy = state.config.promotion.policy().map_err(|e| ApiError::Internal(anyhow::anyhow!(e)))?;
    let mut tx = work.begin().await?;
    let admin =
        trellis_store::identity::find_by_id(&mut *tx, principal.user_id).await?.ok_or(ApiError::Unauthenticated)?;
    let change = Change { flag, value, actor: &admin.handle, reason, forced: body.force };
    let changed = match trellis_store::cutover::flags::set_checked_in(&mut tx, &change, &policy).await {
        Ok(changed) => changed,
        Err(SetError::Refused(why)) => return Err(ApiError::conflict("promotion-refused", why)),
        Err(SetError::Database(e)) => return Err(e.into()),
    };
    work.finish(tx, Emitted::none()).await?;
    Ok(Json(FlagChanged {
        name: flag.as_str(),
        from: changed.from.as_str(),
        to: changed.to.as_str(),
        forced_past: changed.forced_past,
    }))
}

/// One audited change of a flag.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlagAuditEntry {
    pub name: String,
    pub from: String,
    pub to: String,
    /// The admin's handle (API) or the operator's name (`trellisctl`).
    pub actor: String,
    pub reason: String,
    /// Whether the change overrode a promotion gate.
    pub forced: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub changed_at: OffsetDateTime,
}

impl From<AuditRow> for FlagAuditEntry {
    fn from(a: AuditRow) -> Self {
        Self {
            name: a.name,
            from: a.from_value,
            to: a.to_value,
            actor: a.actor,
            reason: a.reason,
            forced: a.forced,
            changed_at: a.changed_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FlagHistory {
    /// Newest first.
    pub items: Vec<FlagAuditEntry>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// 1–100, default 20.
    pub limit: Option<u32>,
}

/// A cutover flag's audited changes, newest first (admins).
#[utoipa::path(get, path = "/v1/admin/flags/{name}/history", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "`score.executor`, `search.executor` or `dispute.executor`"),
        HistoryParams),
    responses((status = 200, body = FlagHistory), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn flag_history(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    Query(params): Query<HistoryParams>,
) -> ApiResult<Json<FlagHistory>> {
    principal.require_admin()?;
    let flag = Flag::parse(&name).map_err(|_| ApiError::NotFound("flag"))?;
    let limit = limit(params.limit, 20, 100)?;
    let rows = trellis_store::cutover::flags::audit(&state.pool, Some(flag), limit as i64).await?;
    Ok(Json(FlagHistory { items: rows.into_iter().map(FlagAuditEntry::from).collect() }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReinstateBody {
    /// Why the suspension is undone, 1–2,000 characters; recorded in the audit with the
    /// admin's handle.
    pub reason: String,
}

/// One audited change of a user's role or status.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserAdminEntry {
    pub user_id: Uuid,
    /// `grant_role`, `suspend` or `reinstate`.
    pub action: String,
    /// A role or a status, before and after.
    pub from: String,
    pub to: String,
    /// The admin's handle (API) or the operator's name (`trellisctl`).
    pub actor: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub acted_at: OffsetDateTime,
}

impl From<user_admin::AuditRow> for UserAdminEntry {
    fn from(a: user_admin::AuditRow) -> Self {
        Self {
            user_id: a.user_id,
            action: a.action.as_str().to_owned(),
            from: a.from_value,
            to: a.to_value,
            actor: a.actor,
            reason: a.reason,
            acted_at: a.acted_at,
        }
    }
}

/// Reinstates a suspended user (admins only): their status is `active` again, the change is
/// audited (admin, reason, from, to) and `identity.user_reinstated` is written through the
/// outbox, all in the request's unit of work (`trellisctl users reinstate` runs the same
/// command). Their tokens stay revoked (they sign in again); a dispute that suspended them
/// stays upheld. One user per call; the reason is at most 2,000 characters. A caller without a
/// valid token gets 401 before any body is read; a caller who is not an admin, 403 before the
/// user is looked up.
#[utoipa::path(post, path = "/v1/admin/users/{user}/reinstate", tag = "admin", security(("bearer" = [])),
    params(("user" = String, Path, description = "user id or handle")), request_body = ReinstateBody,
    responses((status = 200, body = UserAdminEntry), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem, description = "the user is not suspended"),
        (status = 422, body = Problem)))]
async fn reinstate_user(
    principal: Principal,
    work: UnitOfWork,
    Path(user): Path<String>,
    body: Result<Json<ReinstateBody>, ApiError>,
) -> ApiResult<Json<UserAdminEntry>> {
    principal.require_admin()?;
    let Json(body) = body?;
    let reason = AdminReason::parse(&body.reason)?;
    let mut tx = work.begin().await?;
    let target = resolve_user(&mut *tx, &user).await?;
    let admin =
        trellis_store::identity::find_by_id(&mut *tx, principal.user_id).await?.ok_or(ApiError::Unauthenticated)?;
    let actor = user_admin::Actor { name: &admin.handle, user_id: Some(principal.user_id) };
    let reinstated =
        trellis_commands::users::reinstate(&mut tx, UserId(target.id), &actor, &reason).await.map_err(|e| match e {
            AdminError::UnknownUser => ApiError::NotFound("user"),
            AdminError::NotSuspended(status) => ApiError::conflict(
                "user-not-suspended",
                format!("the user is {}: there is nothing to reinstate", status.as_str()),
            ),
            AdminError::Database(e) => e.into(),
        })?;
    let row = work.finish(tx, reinstated).await?;
    tracing::info!(user = %target.id, admin = %principal.user_id, "user reinstated");
    Ok(Json(row.into()))
}
