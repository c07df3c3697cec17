//! The caller's circles: `/v1/me/circles`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use trellis_commands::circles::CircleError;
use trellis_domain::social::CircleName;
use trellis_domain::{CircleId, UserId};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Json, Path, Problem, Query};
use crate::read_replicas::Reader;
use crate::routes::{list, page, resolve_user};
use crate::unit_of_work::UnitOfWork;
use crate::views::{Circle, CircleMember, List, PageParams};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_circles, create_circle))
        .routes(routes!(get_circle, rename_circle, delete_circle))
        .routes(routes!(list_members))
        .routes(routes!(add_member, remove_member))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CircleBody {
    pub name: String,
}

impl From<CircleError> for ApiError {
    fn from(e: CircleError) -> Self {
        match e {
            CircleError::NotFound => ApiError::NotFound("circle"),
            CircleError::NameTaken => {
                ApiError::conflict("circle-name-taken", "you already have a circle with that name")
            }
            CircleError::NotAContact => {
                ApiError::unprocessable("not-a-contact", "circle members must be among your contacts")
            }
            CircleError::NotAMember => ApiError::NotFound("circle member"),
            CircleError::Database(e) => e.into(),
        }
    }
}

/// The caller's circles, oldest first.
#[utoipa::path(get, path = "/v1/me/circles", tag = "circles", security(("bearer" = [])), params(PageParams),
    responses((status = 200, body = List<Circle>), (status = 401, body = Problem)))]
async fn list_circles(
    State(state): State<AppState>,
    reader: Reader,
    Query(params): Query<PageParams>,
) -> ApiResult<Json<List<Circle>>> {
    let (limit, after) = page::<Uuid>(&state, "circles", &params)?;
    let rows = trellis_store::circles::list(reader.pool(), reader.principal.user_id, after, limit).await?;
    Ok(Json(list(&state, "circles", rows, Circle::from)))
}

/// Creates a circle.
#[utoipa::path(post, path = "/v1/me/circles", tag = "circles", security(("bearer" = [])), request_body = CircleBody,
    responses((status = 201, body = Circle), (status = 401, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem)))]
async fn create_circle(principal: Principal, work: UnitOfWork, Json(body): Json<CircleBody>) -> ApiResult<Response> {
    let name = CircleName::parse(&body.name)?;
    let id = CircleId::new();
    let mut tx = work.begin().await?;
    let created = trellis_commands::circles::create(&mut tx, principal.user_id, id, &name).await?;
    let row = work.finish(tx, created).await?;
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/v1/me/circles/{id}"))], Json(Circle::from(row)))
        .into_response())
}

/// One of the caller's circles.
#[utoipa::path(get, path = "/v1/me/circles/{id}", tag = "circles", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Circle), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn get_circle(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
) -> ApiResult<Json<Circle>> {
    let row = trellis_store::circles::get(&state.pool, principal.user_id, id.into())
        .await?
        .ok_or(ApiError::NotFound("circle"))?;
    Ok(Json(row.into()))
}

/// Renames a circle.
#[utoipa::path(patch, path = "/v1/me/circles/{id}", tag = "circles", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = CircleBody,
    responses((status = 200, body = Circle), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn rename_circle(
    principal: Principal,
    work: UnitOfWork,
    Path(id): Path<Uuid>,
    Json(body): Json<CircleBody>,
) -> ApiResult<Json<Circle>> {
    let name = CircleName::parse(&body.name)?;
    let id = CircleId(id);
    let mut tx = work.begin().await?;
    let renamed = trellis_commands::circles::rename(&mut tx, principal.user_id, id, &name).await?;
    let row = work.finish(tx, renamed).await?;
    Ok(Json(row.into()))
}

/// Deletes a circle (its contacts stay contacts).
#[utoipa::path(delete, path = "/v1/me/circles/{id}", tag = "circles", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 204), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn delete_circle(principal: Principal, work: UnitOfWork, Path(id): Path<Uuid>) -> ApiResult<StatusCode> {
    let id = CircleId(id);
    let mut tx = work.begin().await?;
    let deleted = trellis_commands::circles::delete(&mut tx, principal.user_id, id).await?;
    work.finish(tx, deleted).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Members of one of the caller's circles.
#[utoipa::path(get, path = "/v1/me/circles/{id}/members", tag = "circles", security(("bearer" = [])),
    params(("id" = Uuid, Path), PageParams),
    responses((status = 200, body = List<CircleMember>), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn list_members(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<Uuid>,
    Query(params): Query<PageParams>,
) -> ApiResult<Json<List<CircleMember>>> {
    let (limit, after) = page::<Uuid>(&state, "circle-members", &params)?;
    let id = CircleId(id);
    trellis_store::circles::get(reader.pool(), reader.principal.user_id, id)
        .await?
        .ok_or(ApiError::NotFound("circle"))?;
    let rows = trellis_store::circles::members(reader.pool(), id, after, limit).await?;
    Ok(Json(list(&state, "circle-members", rows, CircleMember::from)))
}

/// Adds one of the caller's contacts to a circle (201; 200 if already a member).
#[utoipa::path(put, path = "/v1/me/circles/{id}/members/{user_id}", tag = "circles", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("user_id" = String, Path, description = "user id or handle")),
    responses((status = 201, body = Circle), (status = 200, body = Circle), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn add_member(
    principal: Principal,
    work: UnitOfWork,
    Path((id, user)): Path<(Uuid, String)>,
) -> ApiResult<(StatusCode, Json<Circle>)> {
    let id = CircleId(id);
    let mut tx = work.begin().await?;
    let member = UserId(resolve_user(&mut *tx, &user).await?.id);
    let added = trellis_commands::circles::add_member(&mut tx, principal.user_id, id, member).await?;
    let (added, row) = work.finish(tx, added).await?;
    Ok((if added { StatusCode::CREATED } else { StatusCode::OK }, Json(row.into())))
}

/// Removes a member from a circle.
#[utoipa::path(delete, path = "/v1/me/circles/{id}/members/{user_id}", tag = "circles", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("user_id" = String, Path, description = "user id or handle")),
    responses((status = 204), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn remove_member(
    principal: Principal,
    work: UnitOfWork,
    Path((id, user)): Path<(Uuid, String)>,
) -> ApiResult<StatusCode> {
    let id = CircleId(id);
    let mut tx = work.begin().await?;
    let member = UserId(resolve_user(&mut *tx, &user).await?.id);
    let removed = trellis_commands::circles::remove_member(&mut tx, principal.user_id, id, member).await?;
    work.finish(tx, removed).await?;
    Ok(StatusCode::NO_CONTENT)
}
