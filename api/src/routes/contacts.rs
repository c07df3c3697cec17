//! The caller's contacts: `/v1/me/contacts`.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use trellis_commands::contacts::ContactError;
use trellis_domain::UserId;
use trellis_domain::social::ContactLabel;
use trellis_store::contacts::Upsert;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{BearerToken, Principal};
use crate::error::{ApiError, ApiResult, Json, Path, Problem, Query};
use crate::read_replicas::ReadDb;
use crate::routes::{list, page, resolve_user};
use crate::token_cache::{Cached, Lookup};
use crate::unit_of_work::UnitOfWork;
use crate::views::{Contact, List, PageParams};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_contacts)).routes(routes!(put_contact, delete_contact))
}

/// The caller's contacts, ordered by user id.
#[utoipa::path(get, path = "/v1/me/contacts", tag = "contacts", security(("bearer" = [])), params(PageParams),
    responses((status = 200, body = List<Contact>), (status = 400, body = Problem), (status = 401, body = Problem)))]
async fn list_contacts(
    State(state): State<AppState>,
    token: BearerToken,
    mut db: ReadDb,
    Query(params): Query<PageParams>,
) -> ApiResult<Json<List<Contact>>> {
    let (limit, after) = page::<Uuid>(&state, "contacts", &params)?;
    let ticket = match state.token_cache.lookup(&token.hash) {
        // Authenticated a moment ago: the page alone, by its owner.
        Lookup::Hit(cached) => {
            let rows = trellis_store::contacts::list_for_owner(db.pool(), cached.user_id, after, limit).await?;
            state.activity.saw(token.hash);
            return Ok(Json(list(&state, "contacts", rows, Contact::from)));
        }
        Lookup::Miss(ticket) => Some(ticket),
        Lookup::Bypassed => None,
    };
    let idle = state.config.token_idle_timeout;
    let mut found = trellis_store::contacts::list_for_token(db.pool(), &token.hash, idle, after, limit).await?;
    if found.is_none() && db.on_replica() {
        db.confirm_on_primary();
        found = trellis_store::contacts::list_for_token(db.pool(), &token.hash, idle, after, limit).await?;
    }
    let (principal, rows) = found.ok_or(ApiError::Unauthenticated)?;
    // Only the primary's answer may enter the cache (`crate::token_cache`).
    if let (Some(ticket), false) = (ticket, db.on_replica()) {
        let cached = Cached { user_id: UserId(principal.user_id), role: principal.role };
        state.token_cache.insert(ticket, token.hash, cached, principal.live_for());
    }
    state.activity.saw(token.hash);
    Ok(Json(list(&state, "contacts", rows, Contact::from)))
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ContactBody {
    /// Your label for this contact (may be empty).
    #[serde(default)]
    pub label: String,
}

/// Adds a contact (201) or updates its label (200).
#[utoipa::path(put, path = "/v1/me/contacts/{user_id}", tag = "contacts", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "user id or handle")), request_body = ContactBody,
    responses((status = 201, body = Contact), (status = 200, body = Contact), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn put_contact(
    State(state): State<AppState>,
    token: BearerToken,
    work: UnitOfWork,
    Path(user): Path<String>,
    Json(body): Json<ContactBody>,
) -> ApiResult<(StatusCode, Json<Contact>)> {
    let label = ContactLabel::parse(&body.label)?;
    let mut tx = work.begin().await?;
    // The hottest write: authentication and the target in one round trip.
    let (target_id, target_handle) = crate::routes::user_key(&user);
    let (principal, target) = trellis_store::identity::authenticate_with_target(
        &mut *tx,
        &token.hash,
        state.config.token_idle_timeout,
        target_id,
        target_handle.as_deref(),
    )
    .await?
    .ok_or(ApiError::Unauthenticated)?;
    state.activity.saw(token.hash);
    let target = target.ok_or(ApiError::NotFound("user"))?;
    let put = trellis_commands::contacts::put(&mut tx, UserId(principal.user_id), &target, &label).await?;
    let (outcome, row) = work.finish(tx, put).await?;
    let status = if outcome == Upsert::Created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(row.into())))
}

/// Removes a contact, and with it their place in the caller's circles.
#[utoipa::path(delete, path = "/v1/me/contacts/{user_id}", tag = "contacts", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "user id or handle")),
    responses((status = 204), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn delete_contact(principal: Principal, work: UnitOfWork, Path(user): Path<String>) -> ApiResult<StatusCode> {
    let mut tx = work.begin().await?;
    let target = resolve_user(&mut *tx, &user).await?;
    let removed = trellis_commands::contacts::remove(&mut tx, principal.user_id, UserId(target.id)).await?;
    work.finish(tx, removed).await?;
    Ok(StatusCode::NO_CONTENT)
}

impl From<ContactError> for ApiError {
    fn from(e: ContactError) -> Self {
        match e {
            ContactError::OwnContact => ApiError::unprocessable("self-contact", "you cannot add yourself as a contact"),
            ContactError::Suspended => ApiError::unprocessable("user-suspended", "that user is suspended"),
            ContactError::NotAContact => ApiError::NotFound("contact"),
            ContactError::Database(e) => e.into(),
        }
    }
}
