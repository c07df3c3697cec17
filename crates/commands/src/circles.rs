//! Circles: named groups of one owner's contacts.

use sqlx::PgConnection;
use time::OffsetDateTime;
use trellis_domain::events::{CircleChanged, CircleDeleted, CircleMember, EventPayload};
use trellis_domain::social::CircleName;
use trellis_domain::{CircleId, UserId};
use trellis_store::circles::CircleRow;

use crate::Emitted;

/// Why a circle was not changed.
#[derive(Debug, thiserror::Error)]
pub enum CircleError {
    /// No such circle of this owner (another owner's circle is indistinguishable from a
    /// missing one).
    #[error("no such circle")]
    NotFound,
    #[error("the owner already has a circle with that name")]
    NameTaken,
    #[error("circle members must be among the owner's contacts")]
    NotAContact,
    #[error("not a member of the circle")]
    NotAMember,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn name_taken(e: sqlx::Error) -> CircleError {
    match trellis_store::violated_constraint(&e) {
        Some("circles_owner_name_key") => CircleError::NameTaken,
        _ => e.into(),
    }
}

fn named(payload: fn(CircleChanged) -> EventPayload, row: &CircleRow, owner: UserId) -> EventPayload {
    payload(CircleChanged { circle_id: CircleId(row.id), owner_id: owner, name: row.name.clone() })
}

/// Creates a circle: `circles.circle_created`, caused by its owner.
pub async fn create(
    tx: &mut PgConnection,
    owner: UserId,
    id: CircleId,
    name: &CircleName,
) -> Result<Emitted<CircleRow>, CircleError> {
    let row = trellis_store::circles::insert(tx, id, owner, name.as_str()).await.map_err(name_taken)?;
    let payload = named(EventPayload::CircleCreated, &row, owner);
    Ok(Emitted::new(row).with(&payload, Some(owner), OffsetDateTime::now_utc()))
}

/// Renames a circle: `circles.circle_renamed`.
pub async fn rename(
    tx: &mut PgConnection,
    owner: UserId,
    id: CircleId,
    name: &CircleName,
) -> Result<Emitted<CircleRow>, CircleError> {
    let row = trellis_store::circles::rename(tx, owner, id, name.as_str())
        .await
        .map_err(name_taken)?
        .ok_or(CircleError::NotFound)?;
    let payload = named(EventPayload::CircleRenamed, &row, owner);
    Ok(Emitted::new(row).with(&payload, Some(owner), OffsetDateTime::now_utc()))
}

/// Deletes a circle (its members stay contacts): `circles.circle_deleted`.
pub async fn delete(tx: &mut PgConnection, owner: UserId, id: CircleId) -> Result<Emitted, CircleError> {
    if !trellis_store::circles::delete(tx, owner, id).await? {
        return Err(CircleError::NotFound);
    }
    let payload = EventPayload::CircleDeleted(CircleDeleted { circle_id: id, owner_id: owner });
    Ok(Emitted::none().with(&payload, Some(owner), OffsetDateTime::now_utc()))
}

/// Adds one of the owner's contacts to a circle: `circles.member_added`; nothing (`false`)
/// when they are a member already. Returns the circle as it is now.
pub async fn add_member(
    tx: &mut PgConnection,
    owner: UserId,
    id: CircleId,
    member: UserId,
) -> Result<Emitted<(bool, CircleRow)>, CircleError> {
    trellis_store::circles::get(&mut *tx, owner, id).await?.ok_or(CircleError::NotFound)?;
    if !trellis_store::contacts::exists(&mut *tx, owner, member).await? {
        return Err(CircleError::NotAContact);
    }
    let added = trellis_store::circles::add_member(&mut *tx, owner, id, member).await?;
    let row = trellis_store::circles::get(&mut *tx, owner, id).await?.ok_or(CircleError::NotFound)?;
    let emitted = Emitted::new((added, row));
    if !added {
        return Ok(emitted);
    }
    let payload = EventPayload::CircleMemberAdded(CircleMember { circle_id: id, owner_id: owner, user_id: member });
    Ok(emitted.with(&payload, Some(owner), OffsetDateTime::now_utc()))
}

/// Removes a member from a circle: `circles.member_removed`.
pub async fn remove_member(
    tx: &mut PgConnection,
    owner: UserId,
    id: CircleId,
    member: UserId,
) -> Result<Emitted, CircleError> {
    trellis_store::circles::get(&mut *tx, owner, id).await?.ok_or(CircleError::NotFound)?;
    if !trellis_store::circles::remove_member(tx, id, member).await? {
        return Err(CircleError::NotAMember);
    }
    let payload = EventPayload::CircleMemberRemoved(CircleMember { circle_id: id, owner_id: owner, user_id: member });
    Ok(Emitted::none().with(&payload, Some(owner), OffsetDateTime::now_utc()))
}
