//! The caller's contacts: `/v1/me/contacts`.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use trellis_domain::UserId;
use trellis_domain::events::{CircleMember, ContactChanged, ContactRemoved, EventPayload};
use trellis_domain::social::ContactLabel;
use trellis_store::contacts::Upsert;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{BearerToken, Principal};
use crate::error::{ApiError, ApiResult, Json, Path, Problem, Query};
use crate::routes::{events, list, page, resolve_user};
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
    Query(params): Query<PageParams>,
) -> ApiResult<Json<List<Contact>>> {
    let (limit, after) = page::<Uuid>(&state, "contacts", &params)?;
    let idle = state.config.token_idle_timeout;
    let (_, rows) = trellis_store::contacts::list_for_token(&state.pool, &token.hash, idle, after, limit)
        .await?
        .ok_or(ApiError::Unauthenticated)?;
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
    let principal_id = UserId(principal.user_id);
    let target = target.ok_or(ApiError::NotFound("user"))?;
    let contact_id = UserId(target.id);
    if contact_id == principal_id {
        return Err(ApiError::unprocessable("self-contact", "you cannot add yourself as a contact"));
    }
    if target.status != "active" {
        return Err(ApiError::unprocessable("user-suspended", "that user is suspended"));
    }
    let change = ContactChanged { owner_id: principal_id, contact_id, label: label.as_str().to_owned() };
    let [added, updated] = <[_; 2]>::try_from(events(
        Some(principal_id),
        [EventPayload::ContactAdded(change.clone()), EventPayload::ContactUpdated(change)],
    ))
    .expect("two events");
    let (outcome, row) = trellis_store::contacts::upsert_with_event(
        &mut *tx,
        principal_id,
        contact_id,
        label.as_str(),
        &added,
        &updated,
    )
    .await?;
    work.finish(tx);
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
    let contact_id = UserId(target.id);
    // Memberships go with the contact (a foreign key cascades); each gets its own event.
    let circles = trellis_store::circles::remove_from_all_circles(&mut tx, principal.user_id, contact_id).await?;
    if !trellis_store::contacts::remove(&mut tx, principal.user_id, contact_id).await? {
        return Err(ApiError::NotFound("contact"));
    }
    let payloads = circles
        .into_iter()
        .map(|circle_id| {
            EventPayload::CircleMemberRemoved(CircleMember {
                circle_id: circle_id.into(),
                owner_id: principal.user_id,
                user_id: contact_id,
            })
        })
        .chain([EventPayload::ContactRemoved(ContactRemoved { owner_id: principal.user_id, contact_id })]);
    trellis_store::outbox::insert(&mut tx, &events(Some(principal.user_id), payloads)).await?;
    work.finish(tx);
    Ok(StatusCode::NO_CONTENT)
}
