//! The `/v1` routes, one module per domain; each exports its `router()`.

pub mod admin;
pub mod circles;
pub mod contacts;
pub mod disputes;
pub mod identity;
pub mod moderation;
pub mod scores;
pub mod search;

use serde::de::DeserializeOwned;
use trellis_domain::UserId;
use trellis_domain::identity::Handle;
use trellis_store::identity::UserRow;
use trellis_store::page::Page;
use utoipa_axum::router::OpenApiRouter;

use crate::app::AppState;
use crate::error::ApiError;
use crate::views::{List, PageParams};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(identity::router())
        .merge(contacts::router())
        .merge(circles::router())
        .merge(disputes::router())
        .merge(moderation::router())
        .merge(scores::router())
        .merge(search::router())
        .merge(admin::router())
}

/// A `{user}` path segment as an id or as a (folded) handle; neither when it is invalid.
pub fn user_key(id_or_handle: &str) -> (Option<uuid::Uuid>, Option<String>) {
    if let Ok(id) = id_or_handle.parse::<UserId>() {
        (Some(id.0), None)
    } else if let Ok(handle) = Handle::parse(id_or_handle) {
        (None, Some(handle.as_str().to_owned()))
    } else {
        (None, None)
    }
}

/// Finds a user by id or handle (`{user}` path segments take either).
pub async fn resolve_user(db: impl sqlx::PgExecutor<'_>, id_or_handle: &str) -> Result<UserRow, ApiError> {
    let found = match user_key(id_or_handle) {
        (Some(id), _) => trellis_store::identity::find_by_id(db, UserId(id)).await?,
        (None, Some(handle)) => trellis_store::identity::find_by_handle(db, &handle).await?,
        (None, None) => None,
    };
    found.ok_or(ApiError::NotFound("user"))
}

/// A limit of 1..=`max`, `default` when absent.
pub fn limit(requested: Option<u32>, default: u32, max: u32) -> Result<usize, ApiError> {
    match requested {
        None => Ok(default as usize),
        Some(n) if (1..=max).contains(&n) => Ok(n as usize),
        Some(_) => Err(ApiError::Validation(
            trellis_domain::FieldError::new("limit", "out_of_range", format!("must be between 1 and {max}")).into(),
        )),
    }
}

/// The page's limit (default 50, at most 100) and the position in its cursor, which must be
/// one that the list `list` handed out (sealed with the cursor key).
pub fn page<K: DeserializeOwned>(
    state: &AppState,
    list: &'static str,
    params: &PageParams,
) -> Result<(usize, Option<K>), ApiError> {
    let limit = limit(params.limit, 50, 100)?;
    let cursor = params.cursor.as_deref().map(|c| open_cursor(state, list, c)).transpose()?;
    Ok((limit, cursor))
}

/// The position inside a cursor the list `list` handed out; a 400 for any other string.
pub fn open_cursor<K: DeserializeOwned>(state: &AppState, list: &'static str, cursor: &str) -> Result<K, ApiError> {
    state
        .cursor_key
        .open(list, cursor)
        .ok_or_else(|| ApiError::bad_request("invalid-cursor", "the cursor is not one this list handed out"))
}

/// A page as the client sees it: its items, and its next cursor sealed for the list `list`.
pub fn list<R, T: utoipa::ToSchema>(
    state: &AppState,
    list: &'static str,
    page: Page<R>,
    f: impl FnMut(R) -> T,
) -> List<T> {
    let next_cursor = page.next.as_ref().map(|next| state.cursor_key.seal(list, next));
    List { items: page.items.into_iter().map(f).collect(), next_cursor }
}
